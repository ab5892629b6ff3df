"""Codec registry: a codec owns its weight format, for the modules that store it and the kernels that run it.

A codec declares
  buffer_specs   the tensors stored beside the packed codes (`qweight`), by name, shape and dtype;
  dequantize     codes + those tensors -> the exact fp32 weight;
  kernel_args    which of its tensors fill the kernel ops' `scales`, `aux` and `eta` arguments;
  signed_levels  its decode table: the level of every code per row (or per row and scale group), so that
                 w[r, c] = level[r, g', code[r, c]] · scale[r, group(c)], exactly what dequantize computes.
The kernels (dicompress/kernels) know no codec by name: they call get_codec(name) and use these. The math
that *produces* codes lives beside each codec (tlq.py, uniform.py); the format is separate from the
algorithm, as in compressed-tensors. The built-in codecs register when dicompress.quant is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

CODECS: dict[str, Codec] = {}


@dataclass(frozen=True)
class KernelArgs:
    """Names of the codec buffers the kernel ops take as `scales` (fp [out, G], one per row and scale group),
    `aux` (the tensor the decode table is built from) and `eta` (None: the codec has none, the ops get None)."""
    scales: str
    aux: str
    eta: str | None = None

    def buffers(self, scales: torch.Tensor, aux: torch.Tensor, eta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The ops' arguments as the codec's named buffers (what dequantize and signed_levels read)."""
        return {self.scales: scales, self.aux: aux} | ({self.eta: eta} if self.eta else {})

    def of(self, module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(scales, aux, eta) of a module that holds the codec's buffers as attributes (QuantLinear)."""
        return getattr(module, self.scales), getattr(module, self.aux), getattr(module, self.eta) if self.eta else None


class Codec(Protocol):
    name: str
    kernel_args: KernelArgs

    def buffer_specs(self, out_features: int, in_features: int, bits: int,
                     group_size: int | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor stored beside `qweight`."""

    def dequantize(self, codes: torch.Tensor, buffers: dict[str, torch.Tensor], bits: int,
                   group_size: int | None) -> torch.Tensor:
        """codes int64 [out, in] + buffers -> fp32 weight [out, in]."""

    def signed_levels(self, buffers: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """The decode table from the kernel_args buffers: fp32 [out, G', 2^bits], G' = 1 (one table per row)
        or the number of scale groups (one per row and group); levels before the `scales` multiply."""


_MEMBERS = ("name", "kernel_args", "buffer_specs", "dequantize", "signed_levels")


def register_codec(codec: Codec) -> Codec:
    """Add `codec` under codec.name (a later one with the same name replaces it); returns it."""
    missing = [m for m in _MEMBERS if not hasattr(codec, m)]
    if missing:
        raise TypeError(f"codec {getattr(codec, 'name', codec)!r} lacks {', '.join(missing)}: a codec declares "
                        f"all of {', '.join(_MEMBERS)} (dicompress/quant/codecs.py)")
    CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise KeyError(f"unknown weight codec {name!r}; known: {', '.join(sorted(CODECS))} (a new codec is "
                       f"added with dicompress.quant.codecs.register_codec)") from None
