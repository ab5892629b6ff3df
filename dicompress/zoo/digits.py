"""The embedded default model's data: scikit-learn's handwritten digits as 16x16 "latents".

The digits are 8x8 in [0, 16]; they are scaled to [-1, 1] and upsampled to 16x16 so that FLUX's
2x2 latent packing gives an 8x8 token grid (64 image tokens of 4 channels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 16          # latent height = width
CHANNELS = 1       # latent channels; packed tokens carry 4 * CHANNELS
NUM_CLASSES = 10


def load_digits_tensors(split: str = "all", seed: int = 0, test_fraction: float = 0.25):
    """Return (images [N,1,16,16] in [-1,1], labels [N]) for split 'train', 'test' or 'all'.

    The split is a fixed stratified permutation so the classifier's held-out accuracy is reproducible.
    """
    # lazy: scikit-learn loads in about a second; only training and the evaluation's real digits need it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    if split != "all":
        idx = torch.arange(len(y)).numpy()
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
        sel = torch.as_tensor(tr if split == "train" else te)
        x, y = x[sel], y[sel]
    return upsample(x), y


def upsample(x8: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x8, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def pack(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2*W/2, 4C], exactly as FluxPipeline._pack_latents."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """[B, L, 4C] -> [B, C, H, W], the inverse of `pack`."""
    b, _, ch = tokens.shape
    x = tokens.view(b, size // 2, size // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, size, size)


def image_ids(size: int = SIZE) -> torch.Tensor:
    """FLUX's positional ids for the packed grid: [L, 3] with (0, row, col)."""
    g = size // 2
    ids = torch.zeros(g, g, 3)
    ids[..., 1] = torch.arange(g)[:, None]
    ids[..., 2] = torch.arange(g)[None, :]
    return ids.view(-1, 3)
