"""The label-embedding feature extractor (docs/math.md sec. 2.3): sizing, exact BatchNorm statistics, determinism,
resume."""
import numpy as np
import pytest
import torch
from conftest import crash_after_saving
from torch import nn

import mnkpipe.baselines.extractor as ext
from mnkpipe.baselines import EmbeddingSettings, train_extractor
from mnkpipe.baselines.extractor import make_extractor_net


pytestmark = pytest.mark.usefixtures("torch_one_thread")


TINY = EmbeddingSettings(channels=6, blocks=3, epochs=4, batch=8, lr=1e-2)


def patterns(n=96, size=10, seed=0):
    """4 classes (global ids 7, 31, 100, 5) = a bright top / bottom / left / right half under noise."""
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % 4
    half = size // 2
    pat = np.zeros((4, size, size), np.float32)
    pat[0, :half], pat[1, half:], pat[2, :, :half], pat[3, :, half:] = 1, 1, 1, 1
    images = (rng.normal(size=(n, 1, size, size)) + 2 * pat[cls][:, None]).astype(np.float32)
    return images, np.array([7, 31, 100, 5])[cls]


@pytest.mark.parametrize("size", [8, 12, 16, 28, 32])
def test_feature_is_channels_for_any_size(size):
    net = make_extractor_net(1, size, EmbeddingSettings(channels=5), n_classes=3)
    assert net[0](torch.zeros(2, 1, size, size)).shape == (2, 5)
    assert net(torch.zeros(2, 1, size, size)).shape == (2, 3)


def test_reference_layout_on_28x28():
    """Three unpadded 3x3 convs and three pools: 28 -> 26 -> 13 -> 11 -> 5 -> 3 -> 1, so the global pool is a no-op."""
    feats = make_extractor_net(1, 28, EmbeddingSettings(), n_classes=20)[0]
    convs = [m for m in feats if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(0, 0)] * 3 and [c.out_channels for c in convs] == [250] * 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in feats) == 3
    assert feats[:-2](torch.zeros(1, 1, 28, 28)).shape == (1, 250, 1, 1)


@pytest.fixture(scope="module")
def trained():
    images, labels = patterns()
    return images, labels, train_extractor(images, labels, TINY, seed=0, checkpoint_dir=None, progress=False)


def test_learns_and_embeds(trained):
    images, labels, e = trained
    assert e.seed == 0 and e.settings == TINY and list(e.classes) == [5, 7, 31, 100]
    z = e.embed(images)
    assert z.shape == (len(images), 6) and z.dtype == np.float64
    with torch.no_grad():
        pred = e.classes[e.net(torch.as_tensor(images)).argmax(1).numpy()]
    assert (pred == labels).mean() > 0.9  # chance is 0.25


def test_batchnorm_statistics_are_those_of_all_training_images(trained):
    """Each BatchNorm's running mean / var = mean / unbiased var of its input over all training images, computed
    here directly by the eval-mode prefix of the net (not the last mini-batch's statistics)."""
    images, _, e = trained
    feats = e.features.eval()
    x = torch.as_tensor(images)
    bns = [i for i, m in enumerate(feats) if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3
    with torch.no_grad():
        for i in bns:
            a = feats[:i](x).double()
            bn = feats[i]
            torch.testing.assert_close(bn.running_mean.double(), a.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bn.running_var.double(), a.transpose(0, 1).flatten(1).var(1), rtol=1e-5,
                                       atol=1e-6)


def test_statistics_over_more_images_than_one_chunk(monkeypatch):
    images, labels = patterns(n=40, size=8)
    monkeypatch.setattr(ext, "CHUNK", 7)  # 40 images in 6 chunks
    e = train_extractor(images, labels, EmbeddingSettings(channels=3, blocks=2, epochs=1, batch=8), seed=1,
                        checkpoint_dir=None, progress=False)
    bn = e.features[1]
    with torch.no_grad():
        a = e.features[0](torch.as_tensor(images)).double()
    torch.testing.assert_close(bn.running_mean.double(), a.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), a.transpose(0, 1).flatten(1).var(1), rtol=1e-5, atol=1e-6)


def test_deterministic_for_a_seed(trained):
    images, labels, e = trained
    again = train_extractor(images, labels, TINY, seed=0, checkpoint_dir=None, progress=False)
    np.testing.assert_array_equal(again.embed(images), e.embed(images))
    other = train_extractor(images, labels, TINY, seed=1, checkpoint_dir=None, progress=False)
    assert not np.array_equal(other.embed(images), e.embed(images))


def test_resume_equals_uninterrupted(trained, tmp_path, monkeypatch):
    images, labels, e = trained
    saves = crash_after_saving(monkeypatch, "epoch", 2)
    with pytest.raises(KeyboardInterrupt):
        train_extractor(images, labels, TINY, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert saves == [1, 2] and not list(tmp_path.glob("*.tmp*"))
    resumed = train_extractor(images, labels, TINY, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert saves == [1, 2, 3, 4]
    np.testing.assert_array_equal(resumed.embed(images), e.embed(images))
    # a finished checkpoint gives the same extractor without training; other data or seed is refused
    np.testing.assert_array_equal(train_extractor(images, labels, TINY, seed=0, checkpoint_dir=tmp_path,
                                                  progress=False).embed(images), e.embed(images))
    assert saves == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="different training"):
        train_extractor(images, labels, TINY, seed=1, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different training"):
        train_extractor(images[:-1], labels[:-1], TINY, seed=0, checkpoint_dir=tmp_path, progress=False)


def test_bad_settings_and_shapes():
    images, labels = patterns(n=8)
    with pytest.raises(ValueError, match="channels"):
        train_extractor(images, labels, EmbeddingSettings(channels=0), seed=0, checkpoint_dir=None, progress=False)
    with pytest.raises(ValueError, match="len\\(labels\\)"):
        train_extractor(images, labels[:-1], TINY, seed=0, checkpoint_dir=None, progress=False)
