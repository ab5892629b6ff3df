"""Codec registry: how a QuantLinear's codes and small tensors decode to a weight.

A codec declares its tensors (besides the packed codes) and decodes codes -> fp32 weight. The math
that *produces* codes lives beside it (tlq.py, uniform.py); the format is separate from the
algorithm, as in compressed-tensors.
"""
from __future__ import annotations

from typing import Protocol

import torch

CODECS: dict[str, "Codec"] = {}


class Codec(Protocol):
    name: str

    def buffer_specs(self, out_features: int, in_features: int, bits: int,
                     group_size: int | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor stored beside `qweight`."""

    def dequantize(self, codes: torch.Tensor, buffers: dict[str, torch.Tensor], bits: int,
                   group_size: int | None) -> torch.Tensor:
        """codes int64 [out, in] + buffers -> fp32 weight [out, in]."""


def register_codec(codec: "Codec") -> "Codec":
    CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> "Codec":
    from . import tlq, uniform  # noqa: F401  (built-in codecs register on import)
    try:
        return CODECS[name]
    except KeyError:
        raise KeyError(f"unknown weight codec {name!r}; known: {', '.join(sorted(CODECS))}") from None


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if not group_size else (in_features + group_size - 1) // group_size
