"""Label modes (docs/math.md eqs. (13), (15), (16)): centred one-hot labels, or label embeddings from a feature
extractor trained on the images of the training tasks only; their regression targets and how predictions are
decoded."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..data import TaskSet
from ..files import atomic_write_text
from ..kernels import mnk
from ..keys import settings_key
from ..pipeline.config import read_table, section

LABEL_MODES = ("onehot", "embedding", "random_embedding")
EMBEDDING_MODES = ("embedding", "random_embedding")  # random_embedding: the same extractor untrained (0 epochs)


def embedding_settings(config_path=None):
    """EmbeddingSettings from the [embedding] table of a TOML file (reference values where absent), types and ranges
    checked; errors name the file and the key."""
    from ..baselines.extractor import EmbeddingSettings
    table, where = read_table(config_path, "embedding")
    s = section(EmbeddingSettings, table, where)
    s.validate(where)
    return s


def mode_settings(settings, mode: str):
    """The extractor settings of an embedding label mode: the [embedding] table, with 0 epochs (random weights,
    BatchNorm statistics of the training images) for random_embedding."""
    from dataclasses import replace
    return replace(settings, epochs=0) if mode == "random_embedding" else settings


def extractor_training_set(tasks: TaskSet) -> tuple[np.ndarray, np.ndarray]:
    """(pool indices, global class ids) of every image of the tasks, support and query: the extractor's data."""
    idx = np.concatenate([tasks.support, tasks.query], axis=1).ravel()
    cls = np.concatenate([np.take_along_axis(tasks.classes, tasks.support_labels, 1),
                          np.take_along_axis(tasks.classes, tasks.query_labels, 1)], axis=1).ravel()
    idx, first = np.unique(idx, return_index=True)
    return idx, cls[first]


def extractor_key(gram_key: str, subset, seed: int, settings) -> dict:
    """What an extractor's checkpoints depend on: the store's Gram key, the training subset, the seed, the settings."""
    return {"gram_key": gram_key, "train_tasks": [int(i) for i in subset], "seed": int(seed),
            "settings": asdict(settings)}


def extractor_dir(results: Path, key: dict) -> Path:
    """<results>/extractors/<hash of key>/: checkpoints of the extractor of one training subset and seed."""
    return Path(results) / "extractors" / settings_key(key)


def write_extractor_key(path: Path, key: dict) -> None:
    """The folder, with key.json saying which extractor it holds (one document, written whole)."""
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "key.json", json.dumps(key, indent=1, sort_keys=True))


def pool_embeddings(images: np.ndarray, train: TaskSet, settings, *, seed: int, checkpoint_dir: Path,
                    progress: bool = True) -> np.ndarray:
    """(N, D) embeddings of the whole pool by an extractor trained on the images of `train` (global class labels)."""
    from ..baselines.extractor import train_extractor
    idx, classes = extractor_training_set(train)
    extractor = train_extractor(images[idx], classes, settings, seed=seed, checkpoint_dir=checkpoint_dir,
                                progress=progress)
    return extractor.embed(images)


def embedding_targets(op: mnk.TaskOps, labels_s, labels_q, emb: np.ndarray, *, test: bool) -> mnk.TaskOps:
    """A training task's targets: each image's class centroid in the task (support and query); a test task's:
    each support image's class centroid among the support embeddings (1-shot: its own embedding), and for its
    queries their class's support centroid (never used to predict)."""
    e_s, e_q = emb[op.support], emb[op.query]
    if test:
        y_s = mnk.centroid_targets(e_s, labels_s)
        centroids = {c: y for c, y in zip(labels_s, y_s)}
        y_q = np.stack([centroids[c] for c in labels_q])
    else:
        y = mnk.centroid_targets(np.concatenate([e_s, e_q]), np.concatenate([labels_s, labels_q]))
        y_s, y_q = y[:len(e_s)], y[len(e_s):]
    return mnk.with_targets(op, y_s, y_q)


def decode(scores: np.ndarray, op: mnk.TaskOps, labels_s, mode: str) -> np.ndarray:
    """Predicted labels: argmax of F for one-hot targets, otherwise the label of the nearest test-support target,
    which is its class centroid (embedding_targets), so the nearest support-class centroid."""
    if mode == "onehot":
        return scores.argmax(1)
    return mnk.nearest_support(scores, op.y_s, labels_s)
