"""What a linear does to its input before the matmul: smoothing, rotation, per-token fake quantization.

    x -> x / smooth -> x · Q -> quantize_per_token(·, act_bits[, zero point]) -> · Wᵀ

The weight was transformed offline to match (W·diag(smooth)·Q), so without quantization the layer computes
exactly what the original did. Q is a randomised Hadamard diag(signs)·H_n, stored as its ±1 signs and
applied in O(n log n) by `apply_hadamard` (never as a matrix), or a dense orthogonal matrix (the
outlier-aware R1·P·R2).

Buffers (persistent: they are saved with the model; their dtypes are part of the artifact format):
    smooth    float32 [in]        SmoothQuant divisor
    signs     int8    [in]        ±1 of the randomised Hadamard
    rotation  float32 [in, in]    dense orthogonal matrix
Spec (JSON, kept in the manifest, enough to rebuild the empty module before weights are read):
    {"smooth": bool, "rotation": null | "hadamard" | "dense", "act_bits": null | 2..16, "granularity": "token",
     "zero_point": true}      (the last key only when set: asymmetric activations, quant/activation.py)
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import act_forward
from ..quant.activation import check_act_bits
from ..quant.hadamard import apply_hadamard, hadamard_plan

ROTATIONS = ("hadamard", "dense")
GRANULARITIES = ("token",)
SPEC_KEYS = {"smooth", "rotation", "act_bits", "granularity", "zero_point"}


class ActTransform(nn.Module):
    def __init__(self, in_features: int, smooth: bool = False, rotation: str | None = None,
                 act_bits: int | None = None, device=None, zero_point: bool = False):
        super().__init__()
        self.in_features = in_features
        self.rotation_kind: str | None = None
        self.act_bits = None if act_bits is None else check_act_bits(act_bits)
        self.zero_point = bool(zero_point)    # asymmetric per-token grid (when act_bits is set)
        if smooth:
            self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device))
        if rotation is not None:
            self._add_rotation(rotation, device)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: dict, in_features: int, device="meta") -> "ActTransform":
        """The empty transform a spec describes (buffers of the right shapes and dtypes on `device`)."""
        if not isinstance(spec, dict) or set(spec) - SPEC_KEYS:
            raise ValueError(f"activation transform spec {spec!r} has keys this dicompress does not know "
                             f"(known: {sorted(SPEC_KEYS)}); upgrade dicompress")
        if spec.get("granularity", "token") not in GRANULARITIES:
            raise ValueError(f"activation granularity {spec['granularity']!r} is not one of {GRANULARITIES}")
        if not isinstance(spec.get("zero_point", False), bool):
            raise ValueError(f"activation zero_point must be true or false, got {spec['zero_point']!r}")
        return cls(in_features, smooth=bool(spec.get("smooth")), rotation=spec.get("rotation"),
                   act_bits=spec.get("act_bits"), device=device, zero_point=spec.get("zero_point", False))

    def spec(self) -> dict:
        out = {"smooth": self.has_smooth, "rotation": self.rotation_kind, "act_bits": self.act_bits,
               "granularity": "token"}
        if self.zero_point:         # only then: symmetric artifacts stay readable by earlier versions
            out["zero_point"] = True
        return out

    def _add_rotation(self, kind: str, device) -> None:
        if self.rotation_kind is not None:
            raise ValueError(f"this input is already rotated ({self.rotation_kind}); a second rotation is not "
                             "supported: run `ars` once")
        n = self.in_features
        if kind == "hadamard":
            hadamard_plan(n)                            # ValueError naming the supported orders
            self.register_buffer("signs", torch.ones(n, dtype=torch.int8, device=device))
        elif kind == "dense":
            self.register_buffer("rotation", torch.eye(n, dtype=torch.float32, device=device))
        else:
            raise ValueError(f"unknown rotation {kind!r}; known: {ROTATIONS}")
        self.rotation_kind = kind

    # -- what the passes set -------------------------------------------------------------------
    def set_smooth(self, s: torch.Tensor) -> None:
        if self.has_smooth or self.rotation_kind is not None:
            raise ValueError("smoothing must be set once, before any rotation (run `smooth` once, before `ars`)")
        self.register_buffer("smooth", s.detach().to(torch.float32).reshape(self.in_features).clone())

    def set_hadamard(self, signs: torch.Tensor) -> None:
        if not bool((signs.abs() == 1).all()):
            raise ValueError("Hadamard signs must all be +1 or -1")
        self._add_rotation("hadamard", signs.device)
        self.signs.copy_(signs.detach().reshape(self.in_features).to(torch.int8))

    def set_dense(self, rotation: torch.Tensor) -> None:
        self._add_rotation("dense", rotation.device)
        self.rotation.copy_(rotation.detach().to(torch.float32))

    def set_act_bits(self, bits: int | None, zero_point: bool | None = None) -> None:
        """Quantize the input to `bits` per token (None: float); `zero_point` True / False sets the grid
        (asymmetric / symmetric), None keeps the one this transform has."""
        self.act_bits = None if bits is None else check_act_bits(bits)
        if zero_point is not None:
            self.zero_point = bool(zero_point)

    @property
    def has_smooth(self) -> bool:
        # a parameter too: a user who trains the divisor makes it one (the layer then takes the differentiable
        # path, kernels/linear.py)
        return "smooth" in self._buffers or "smooth" in self._parameters

    def describe(self) -> str:
        """Short label for reports: e.g. 'smooth+hadamard+a8', 'hadamard+a4-asym', 'identity'."""
        parts = (["smooth"] if self.has_smooth else []) + ([self.rotation_kind] if self.rotation_kind else []) \
            + ([f"a{self.act_bits}" + ("-asym" if self.zero_point else "")] if self.act_bits else [])
        return "+".join(parts) or "identity"

    # -- math -----------------------------------------------------------------------------------
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x · Q (Q the stored rotation; identity if none). `ars` folds the weight through this too: W·Q."""
        if self.rotation_kind == "hadamard":
            return apply_hadamard(x * self.signs.to(x.dtype))
        if self.rotation_kind == "dense":
            return x @ self.rotation.to(x.dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # smooth -> rotate -> quantize through the kernel ops (one fused Triton kernel on CUDA)
        return act_forward(self, x)

    @property
    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.describe()}"


class TransformedLinear(nn.Linear):
    """A float nn.Linear whose weight lives in the transformed basis: y = act(x)·Wᵀ + b.

    Still an nn.Linear, so the weight quantizers take it like any linear and hand `act` on to the
    QuantLinear they build; a model that is never weight-quantized (W16A8) saves and loads it as is.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: ActTransform | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.act = act if act is not None else ActTransform(in_features, device=device)

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "TransformedLinear":
        """`linear` with an identity transform, sharing its parameters (no copy, no random init)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                  act=ActTransform(linear.in_features, device=linear.weight.device))
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.act(x))


def act_entry(name: str, module: nn.Module) -> dict:
    """The manifest entry that gives `module` (a linear carrying `act`) its current transform on replay."""
    return {"op": "act", "module": name, "in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None, "act": module.act.spec()}
