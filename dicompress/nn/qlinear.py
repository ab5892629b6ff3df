"""QuantLinear: a Linear whose weight is stored as packed b-bit codes plus a codec's small tensors.

Storage (all persistent buffers, so they round-trip through safetensors / diffusers loading):
  qweight  uint8 [out_features, packed_bytes(in_features, bits)]  codes, see quant/packing.py
  <codec buffers>  e.g. TLQ: scales [out, groups] fp16, grid [out, 4] fp16, eta [1] fp32
  bias     the original bias (Parameter), or absent
  act.*    optional ActTransform (nn/act.py): smoothing / rotation / activation quantization of the input,
           which the stored weight was transformed to match
  lowrank_up [out, r], lowrank_down [r, in]  bf16, optional (quant/lowrank.py): a 16-bit rank-r branch in the
           same basis; the codes then hold the residual W - up·down

forward runs the kernel ops (kernels/): on CUDA a fused Triton GEMM decodes the packed codes tile by tile;
on CPU the pure-torch reference decodes the weight on every call (no fp32 copy is kept, so memory stays packed).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import quant_linear_forward
from ..quant.codecs import get_codec
from ..quant.lowrank import BRANCH_DTYPE, branch_forward
from ..quant.packing import pack_codes, packed_bytes, unpack_codes
from .act import ActTransform


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, codec: str, bits: int,
                 group_size: int | None = None, device=None, bias_dtype: torch.dtype = torch.float32,
                 act: ActTransform | None = None, lowrank_rank: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.codec, self.bits, self.group_size = codec, bits, group_size
        c = get_codec(codec)
        self.register_buffer("qweight", torch.empty(out_features, packed_bytes(in_features, bits),
                                                    dtype=torch.uint8, device=device))
        for name, (shape, dtype) in c.buffer_specs(out_features, in_features, bits, group_size).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.register_module("act", act)
        self.lowrank_rank = int(lowrank_rank)
        if self.lowrank_rank:
            self.register_buffer("lowrank_up", torch.empty(out_features, self.lowrank_rank, dtype=BRANCH_DTYPE,
                                                           device=device))
            self.register_buffer("lowrank_down", torch.empty(self.lowrank_rank, in_features, dtype=BRANCH_DTYPE,
                                                             device=device))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_manifest(cls, entry: dict, device="meta") -> "QuantLinear":
        act = entry.get("act")
        act = None if act is None else ActTransform.from_spec(act, entry["in_features"], device=device)
        return cls(entry["in_features"], entry["out_features"], entry["bias"], entry["codec"], entry["bits"],
                   entry.get("group_size"), device=device, act=act, lowrank_rank=entry.get("lowrank_rank", 0))

    @classmethod
    def from_linear_codes(cls, linear: nn.Linear, codes: torch.Tensor, buffers: dict[str, torch.Tensor],
                          codec: str, bits: int, group_size: int | None = None,
                          act: ActTransform | None = None,
                          lowrank: tuple[torch.Tensor, torch.Tensor] | None = None) -> "QuantLinear":
        """The QuantLinear for `linear` holding `codes` [out, in] and the codec's `buffers`, on the
        linear's device, carrying its bias (in the bias's own dtype), the input transform `act` and the
        low-rank branch `lowrank` = (up [out, r], down [r, in]) if given (the codes then hold the residual)."""
        bias = linear.bias
        q = cls(linear.in_features, linear.out_features, bias is not None, codec, bits, group_size,
                device=linear.weight.device, bias_dtype=bias.dtype if bias is not None else torch.float32, act=act,
                lowrank_rank=0 if lowrank is None else lowrank[0].shape[1])
        expected = {n: getattr(q, n).shape for n in q.codec_buffers()}
        given = {n: t.shape for n, t in buffers.items()}
        if expected != given or codes.shape != (q.out_features, q.in_features):
            raise ValueError(f"{codec} buffers {given} / codes {tuple(codes.shape)} do not match the layer: "
                             f"expected {expected} / {(q.out_features, q.in_features)}")
        with torch.no_grad():
            q.qweight.copy_(pack_codes(codes, bits))
            for n, t in buffers.items():
                getattr(q, n).copy_(t)
            if bias is not None:
                q.bias.copy_(bias)
            if lowrank is not None:
                if lowrank[0].shape != q.lowrank_up.shape or lowrank[1].shape != q.lowrank_down.shape:
                    raise ValueError(f"low-rank factors {tuple(lowrank[0].shape)} / {tuple(lowrank[1].shape)} do "
                                     f"not match the layer: expected {tuple(q.lowrank_up.shape)} / "
                                     f"{tuple(q.lowrank_down.shape)}")
                q.lowrank_up.copy_(lowrank[0])
                q.lowrank_down.copy_(lowrank[1])
        return q

    def manifest_entry(self, name: str) -> dict:
        entry = {"op": "quantize", "module": name, "codec": self.codec, "bits": self.bits,
                 "group_size": self.group_size, "in_features": self.in_features,
                 "out_features": self.out_features, "bias": self.bias is not None}
        if self.act is not None:   # only then: manifests without transforms stay as they were
            entry["act"] = self.act.spec()
        if self.lowrank_rank:
            entry["lowrank_rank"] = self.lowrank_rank
        return entry

    # -- math -----------------------------------------------------------------------------------
    def codec_buffers(self) -> dict[str, torch.Tensor]:
        names = get_codec(self.codec).buffer_specs(self.out_features, self.in_features, self.bits, self.group_size)
        return {n: getattr(self, n) for n in names}

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The effective fp32 weight [out, in] (decoded codes, plus the low-rank branch if any)."""
        w = get_codec(self.codec).dequantize(self.codes(), self.codec_buffers(), self.bits, self.group_size)
        if self.lowrank_rank:
            w = w + self.lowrank_up.float() @ self.lowrank_down.float()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the kernel ops: fused Triton on CUDA, the exact pure-torch reference on CPU (dicompress/kernels)
        y = quant_linear_forward(self, x)
        if self.lowrank_rank:   # the branch reads the input smoothed and rotated as the weight was, unquantized
            y = y + branch_forward(self._weight_basis(x), self.lowrank_up, self.lowrank_down)
        return y

    def _weight_basis(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act
        if a is None:
            return x
        if a.has_smooth:
            x = x / a.smooth.to(x.dtype)
        return a.rotate(x)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the quantized weight: codes, every codec tensor and the input transform's tensors
        (smoothing vector, signs, rotation: the layer cannot run without them) and the low-rank branch; bias not
        included."""
        branch = [self.lowrank_up, self.lowrank_down] if self.lowrank_rank else []
        own = sum(t.numel() * t.element_size() for t in [self.qweight, *self.codec_buffers().values(), *branch])
        return own + (self.act.storage_bytes if self.act is not None else 0)

    def extra_repr(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "channel"
        r = f", lowrank r{self.lowrank_rank}" if self.lowrank_rank else ""
        return (f"in={self.in_features}, out={self.out_features}, {self.codec} w{self.bits} {g}{r}, "
                f"bias={self.bias is not None}")
