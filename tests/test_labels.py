"""Label-embedding targets and decoding of a test task (docs/math.md): class centroids of the support embeddings."""

import numpy as np

from mnkpipe.evaluation.labels import decode, embedding_targets
from mnkpipe.kernels import mnk


def make_task(support_labels, query_labels, seed=0):
    """TaskOps of one task on a small pool (support images first, then queries) with a linear kernel."""
    n_s, n_q = len(support_labels), len(query_labels)
    feats = np.random.default_rng(seed).normal(size=(n_s + n_q, 8))
    k = feats @ feats.T
    return mnk.task_ops(lambda r, c: k[np.ix_(r, c)], np.arange(n_s), np.asarray(support_labels),
                        np.arange(n_s, n_s + n_q), np.asarray(query_labels), way=2)


def test_k_shot_targets_and_decoding_use_support_class_centroids():
    labels_s, labels_q = np.array([0, 0, 1, 1]), np.array([1, 0])  # 2-way 2-shot
    op = make_task(labels_s, labels_q)
    # class 0 spread wide (centroid (10, 0)), class 1 tight (centroid (10, 3))
    emb = np.array([[0.0, 0.0], [20.0, 0.0], [9.0, 3.0], [11.0, 3.0], [0.0, 0.0], [0.0, 0.0]])
    t = embedding_targets(op, labels_s, labels_q, emb, test=True)
    centroids = np.array([[10.0, 0.0], [10.0, 0.0], [10.0, 3.0], [10.0, 3.0]])
    np.testing.assert_allclose(t.y_s, centroids)
    np.testing.assert_allclose(t.y_q, [[10.0, 3.0], [10.0, 0.0]])
    np.testing.assert_allclose(t.r_q, op.k_qs @ op.T @ centroids)
    # (18, 2.5): nearest support image (20, 0) is class 0, nearest class centroid (10, 3) is class 1
    scores = np.array([[18.0, 2.5], [1.0, -1.0]])
    np.testing.assert_array_equal(decode(scores, t, labels_s, "embedding"), [1, 0])


def test_one_shot_targets_are_the_support_embeddings():
    labels_s, labels_q = np.array([1, 0]), np.array([0, 1, 1])
    op = make_task(labels_s, labels_q)
    emb = np.random.default_rng(3).normal(size=(5, 4))
    t = embedding_targets(op, labels_s, labels_q, emb, test=True)
    np.testing.assert_array_equal(t.y_s, emb[:2])
    np.testing.assert_array_equal(t.y_q, emb[[1, 0, 0]])
