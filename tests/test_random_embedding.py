"""Label mode random_embedding: the [embedding] extractor untrained (0 epochs), beside the trained one."""


import numpy as np
import pytest

from mnkpipe.baselines.extractor import EmbeddingSettings, train_extractor
from mnkpipe.evaluation.evaluate import evaluate
from mnkpipe.evaluation.labels import extractor_training_set
from mnkpipe.evaluation.protocol import train_subsets
from mnkpipe.store import open_store



def test_random_embedding_rows_come_from_the_untrained_extractor(shared_smoke_store, tmp_path):
    cfg = tmp_path / "emb.toml"
    cfg.write_text("[embedding]\nchannels = 8\nblocks = 2\nepochs = 3\nbatch = 4\nlr = 0.01\n")
    r = evaluate(shared_smoke_store, out=tmp_path / "res", config=cfg, labels=["embedding", "random_embedding"],
                 train_counts=[2], seeds=1, augment=[1], cpus=2, progress=False)["methods"]
    for m in ("mnk", "meta_term"):
        assert f"{m}/random_embedding/K1" in r and f"{m}/embedding/K1" in r
    assert r["r_t/random_embedding"]["hyperparameters"]["embedding"]["epochs"] == 0
    assert r["r_t/embedding"]["hyperparameters"]["embedding"]["epochs"] == 3
    assert (tmp_path / "res" / "results.md").read_text().count("random_embedding labels") >= 3
    # the untrained extractor is the seed's initial network with the training images' BatchNorm statistics
    store = open_store(shared_smoke_store)
    train = store.episodes().train.subset(train_subsets(store.episodes().train.n_tasks, [2], 0)[2])
    idx, classes = extractor_training_set(train)
    settings = EmbeddingSettings(channels=8, blocks=2, epochs=0, batch=4, lr=0.01)
    a = train_extractor(store.images()[idx], classes, settings, seed=0, checkpoint_dir=None, progress=False)
    b = train_extractor(store.images()[idx], classes, settings, seed=0, checkpoint_dir=None, progress=False)
    trained = train_extractor(store.images()[idx], classes, EmbeddingSettings(8, 2, 3, 4, 0.01), seed=0,
                              checkpoint_dir=None, progress=False)
    x = store.images()[:20]
    np.testing.assert_array_equal(a.embed(x), b.embed(x))
    assert not np.allclose(a.embed(x), trained.embed(x))


def test_negative_epochs_are_still_refused():
    with pytest.raises(ValueError, match="epochs = -1: must be >= 0"):
        EmbeddingSettings(epochs=-1).validate()
