"""Distillation losses: pure functions of (prediction, target) tensors, computed in fp32, returning a scalar."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

EPS = 1e-6   # keeps an all-zero token's direction finite (its normalised vector is then 0)


def normalized_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PPCL's loss: per token (last dim = channels), || p/||p|| - t/||t|| ||^2 summed over channels, then
    the mean over tokens and batch. Blind to each token's scale, so streams of very different magnitude
    (image vs text) weigh the same."""
    p = F.normalize(pred.float(), dim=-1, eps=EPS)
    t = F.normalize(target.float(), dim=-1, eps=EPS)
    return (p - t).pow(2).sum(-1).mean()


def normalized_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PPCL's width-pruning loss: L1 between L2-normalised tokens, summed over channels, mean over tokens."""
    p = F.normalize(pred.float(), dim=-1, eps=EPS)
    t = F.normalize(target.float(), dim=-1, eps=EPS)
    return (p - t).abs().sum(-1).mean()


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element (the velocity-matching loss)."""
    return F.mse_loss(pred.float(), target.float())


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "normalized_l2": normalized_l2, "normalized_l1": normalized_l1, "mse": mse}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown distillation loss {name!r}; available: {', '.join(sorted(LOSSES))}") from None
