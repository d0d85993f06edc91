"""The label-embedding feature extractor of docs/math.md sec. 2.3: a CNN trained by supervised cross-entropy on the
training tasks' images (global class labels); its embedding is the D = channels feature before the linear head.

Sizing rule (any image size >= 1, D = channels always): block b's 3x3 conv is unpadded when its input side is >= 4
(the reference's layout) and padded (side kept) below that; the block max-pools 2x2 while the conv's output side is
>= 2; a final global average pool reduces what is left to 1x1. On 28x28 with 3 blocks this is exactly the reference
(26, 13, 11, 5, 3, 1: the global pool is the identity); on 16x16: 14, 7, 5, 2, 2 (padded), 1; on 8x8: 6, 3, 3
(padded), 1.

BatchNorm: after training, each BatchNorm layer's running mean and variance are set, layer by layer in eval mode,
to the exact mean and (unbiased) variance of its input over all training images: the statistics a single train-mode
pass over the whole training set would use, not those of the last mini-batch (the reference's momentum-1 pitfall).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint

EXTRACTOR_CHECKPOINT = "extractor.pt"
CHUNK = 512  # images per forward pass when computing statistics or embeddings (memory only, results unchanged)


@dataclass
class EmbeddingSettings:
    """The [embedding] table: the reference's values as defaults."""
    channels: int = 250    # conv channels = embedding dimension D
    blocks: int = 3        # conv blocks
    epochs: int = 50
    batch: int = 16        # mini-batch size
    lr: float = 1e-3       # Adam

    def validate(self, where: str = "[embedding]") -> None:
        """Raise ValueError naming the first setting out of its range."""
        for key in ("channels", "blocks", "epochs", "batch"):
            if getattr(self, key) < (0 if key == "epochs" else 1):  # 0 epochs: untrained, random weights
                raise ValueError(f"{where} {key} = {getattr(self, key)!r}: must be >= {0 if key == 'epochs' else 1}")
        if not self.lr > 0:
            raise ValueError(f"{where} lr = {self.lr!r}: must be > 0")


def make_extractor_net(in_channels: int, image_size: int, settings: EmbeddingSettings, n_classes: int) -> nn.Sequential:
    """features(x) = GAP(B_blocks(...B_1(x))) in R^channels, B = [MaxPool2](ReLU(BN(Conv3x3(.)))); head = Linear."""
    side, layers = image_size, []
    for b in range(settings.blocks):
        pad = 0 if side >= 4 else 1
        layers += [nn.Conv2d(in_channels if b == 0 else settings.channels, settings.channels, 3, padding=pad),
                   nn.BatchNorm2d(settings.channels), nn.ReLU()]
        side -= 2 * (1 - pad)
        if side >= 2:
            layers.append(nn.MaxPool2d(2))
            side //= 2
    features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(features, nn.Linear(settings.channels, n_classes))


class Extractor:
    """A trained extractor: .embed(images) -> (N, D) float64 features in eval mode (head dropped)."""

    def __init__(self, net: nn.Sequential, settings: EmbeddingSettings, seed: int, classes: np.ndarray):
        self.net, self.settings, self.seed, self.classes = net, settings, seed, classes

    @property
    def features(self) -> nn.Sequential:
        return self.net[0]

    def embed(self, images: np.ndarray) -> np.ndarray:
        """e(x) = features(x) with BatchNorm in eval mode (running statistics of the training images)."""
        device = next(self.net.parameters()).device
        self.net.eval()
        with torch.no_grad():
            out = [self.features(torch.as_tensor(images[i:i + CHUNK], dtype=torch.float32, device=device))
                   for i in range(0, len(images), CHUNK)]
        return torch.cat(out).double().cpu().numpy() if out else np.zeros((0, self.settings.channels))


def set_exact_bn_statistics(features: nn.Sequential, x: torch.Tensor) -> None:
    """For each BatchNorm in order: running_mean = mean, running_var = unbiased var of its input over all of x
    (earlier layers in eval mode with their exact statistics already set)."""
    features.eval()
    for bn in [m for m in features if isinstance(m, nn.BatchNorm2d)]:
        acc = {"s": 0.0, "ss": 0.0, "n": 0}

        def hook(_module, inputs):
            a = inputs[0].double()
            acc["s"] = acc["s"] + a.sum((0, 2, 3))
            acc["ss"] = acc["ss"] + (a * a).sum((0, 2, 3))
            acc["n"] += a.shape[0] * a.shape[2] * a.shape[3]

        handle = bn.register_forward_pre_hook(hook)
        with torch.no_grad():
            for i in range(0, len(x), CHUNK):
                features(x[i:i + CHUNK])
        handle.remove()
        n = acc["n"]
        mean = acc["s"] / n
        var = (acc["ss"] - n * mean * mean) / max(n - 1, 1)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))
        bn.num_batches_tracked.fill_(1)


def _data_digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def train_extractor(images: np.ndarray, labels: np.ndarray, settings: EmbeddingSettings, *, seed: int,
                    checkpoint_dir: Path | None, progress: bool = True, device: str = "cpu") -> Extractor:
    """theta* ~ argmin_theta mean CE(head(features_theta(x_i)), c_i) by Adam over `epochs` shuffled mini-batches.

    images (N, C, H, W) float32 of the training tasks only; labels (N,) global class ids. Deterministic for a seed
    (on a given device); checkpointed after every epoch into checkpoint_dir and resumed from there (a checkpoint
    of other data, settings or seed is refused).
    """
    settings.validate()
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"images must be (N, C, H, W) with N = len(labels) > 0; got {images.shape} and "
                         f"{labels.shape}")
    classes, y_np = np.unique(labels, return_inverse=True)
    torch.manual_seed(seed)
    net = make_extractor_net(images.shape[1], min(images.shape[2:]), settings, len(classes)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
    x = torch.as_tensor(images, device=device)
    y = torch.as_tensor(y_np, dtype=torch.long, device=device)
    ident = {"settings": asdict(settings), "seed": seed, "data": _data_digest(images, labels)}
    ckpt = Path(checkpoint_dir) / EXTRACTOR_CHECKPOINT if checkpoint_dir is not None else None
    start = 0
    if ckpt is not None and ckpt.exists():
        st = torch.load(ckpt, map_location=device, weights_only=True)
        if st["ident"] != ident:
            raise ValueError(f"extractor checkpoint {ckpt} was written by a different training "
                             f"(settings, seed or images differ); remove it or use another folder")
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        start = st["epoch"]
    net.train()
    bar = tqdm(range(start, settings.epochs), initial=start, total=settings.epochs, disable=not progress,
               desc="embedding extractor")
    for epoch in bar:
        order = torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(len(x)), device=device)
        total = 0.0
        for i in range(0, len(x), settings.batch):
            idx = order[i:i + settings.batch]
            if len(idx) < 2:  # BatchNorm needs more than one value per channel in train mode
                continue
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(x):.3f}")
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.save_checkpoint(ckpt, {"ident": ident, "epoch": epoch + 1, "net": net.state_dict(),
                                    "opt": opt.state_dict()})
    bar.close()
    set_exact_bn_statistics(net[0], x)
    net.eval()
    return Extractor(net, settings, seed, classes)
