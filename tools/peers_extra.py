"""The strongest published post-training quantizers, run here as their libraries ship them (issue 21): torchao
int4 weight-only and int8-dynamic-activation + int4-weight, NVIDIA ModelOpt INT8 SmoothQuant and W4A8 AWQ, HQQ,
AutoRound (tools/peers_autoround.py) and sdnq with its SVD branch (tools/peers.apply_sdnq).

Every `apply_*` quantizes exactly the linears of `iter_linears(model, include, keep)` (each library's own layer
filter is given the literal list of names, and the result is checked), in place, on this CPU in fp32, and returns
{"bytes", "bf16_bytes", "layers", ...}: `bytes` is the storage of the quantized weights (codes + scales + zero
points), measured from the library's own modules or tensors.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dicompress.nn.surgery import iter_linears, set_module
from peers import _storage_bytes


def _targets(model: nn.Module, include: Iterable[str], keep: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    targets = list(iter_linears(model, include, keep))
    if not targets:
        raise ValueError(f"no nn.Linear matches include {list(include)} minus keep {list(keep)}")
    return targets


def _bf16(targets) -> int:
    return sum(lin.weight.numel() * 2 for _, lin in targets)


# ---------------------------------------------------------------------------------------------------------------
# torchao
# ---------------------------------------------------------------------------------------------------------------

def apply_torchao_int4wo(model: nn.Module, include: Iterable[str], keep: Iterable[str] = (),
                         group_size: int = 128) -> dict:
    """torchao int4 weight-only, the CPU form: `PrototypeInt4WeightOnlyConfig` (torchao 0.18's CPU int4
    weight-only config, Int4OpaqueTensor: asymmetric int4 per group, tinygemm qparams, weights prepacked by
    `torch.ops.aten._convert_weight_to_int4pack_for_cpu`, matmul by `_weight_int4pack_mm_for_cpu`, which runs in
    fp32 here). `Int4WeightOnlyConfig` itself needs CUDA on this torchao: its plain layout quantizes with mslk (not
    installable without CUDA), its tile_packed_to_4d layout with the CUDA tinygemm kernel. group_size 128 is
    torchao's default for both.

    `bytes`: the Int4OpaqueTensor's packed uint8 codes + its scale_and_zero tensor (in the weight dtype, fp32).
    The evaluation then runs on the weights read back through torchao's own int4 matmul (applied to the identity):
    the same values, at fp32-linear speed (the packed kernel takes ~50x an fp32 linear's time on this CPU).
    """
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor, PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    targets = _targets(model, include, keep)
    names = {n for n, _ in targets}
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group_size), filter_fn=lambda m, fqn: fqn in names)
    got = {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Int4OpaqueTensor)}
    if got != names:
        raise RuntimeError(f"torchao quantized {len(got)} linears, expected the {len(names)} selected")
    total = sum(_storage_bytes(model.get_submodule(n).weight) for n in names)
    for n in names:   # evaluated at fp32 speed: the packed-int4 CPU matmul takes ~50x an fp32 linear's time here
        lin = model.get_submodule(n)
        # the weight exactly as torchao's kernel dequantizes it: its matmul applied to the identity
        w = F.linear(torch.eye(lin.in_features, dtype=torch.float32), lin.weight).T.contiguous()
        lin.weight = nn.Parameter(w, requires_grad=False)
    return {"bytes": total, "bf16_bytes": _bf16(targets), "layers": len(names), "group_size": group_size,
            "evaluated_as": "fp32 weights read back through _weight_int4pack_mm_for_cpu (identity input)"}


def apply_torchao_w4a8(model: nn.Module, include: Iterable[str], keep: Iterable[str] = (),
                       group_size: int = 32) -> dict:
    """torchao int8 dynamic activation + int4 weight: `Int8DynamicActivationIntxWeightConfig(weight_dtype=
    torch.int4, weight_granularity=PerGroup(32))`, torchao's documented defaults otherwise (symmetric int4 weights
    per group of 32, activations quantized per token, asymmetric int8, at run time). Its CPU-kernel layout
    (`intx_packing_format="opaque_torchao_auto"`) and the prototype CPU DA8W4 config both need torchao's C++ kernel
    library, which does not load in this venv ("TorchAO kernel library is not loaded" / "da8w4_linear_cpu kernel
    ... available": the wheel's extensions are built for another Python), so the default
    `unpacked_to_int8` layout runs: the same codes and scales, the activation quantize-dequantize then an fp32
    linear (torchao's reference path, numerically the quantized model).

    `bytes`: that layout holds each int4 code in an int8 byte; the row counts the codes at 4 bits (what every
    packed layout of the same codes stores) + the scales and zero points as held; `bytes_stored` is the raw
    storage.
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_
    from torchao.quantization.quantize_.workflows import IntxUnpackedToInt8Tensor

    targets = _targets(model, include, keep)
    names = {n for n, _ in targets}
    cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    quantize_(model, cfg, filter_fn=lambda m, fqn: fqn in names)
    got = {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), IntxUnpackedToInt8Tensor)}
    if got != names:
        raise RuntimeError(f"torchao quantized {len(got)} linears, expected the {len(names)} selected")
    packed = stored = 0
    for n in names:
        w = model.get_submodule(n).weight
        assert w.activation_quantization == "int8_asym_per_token", w.activation_quantization
        side = _storage_bytes(w.scale) + _storage_bytes(w.zero_point)
        packed += (w.qdata.numel() * 4 + 7) // 8 + side
        stored += _storage_bytes(w.qdata) + side
    return {"bytes": packed, "bytes_stored": stored, "bf16_bytes": _bf16(targets), "layers": len(names),
            "group_size": group_size}


# ---------------------------------------------------------------------------------------------------------------
# NVIDIA ModelOpt
# ---------------------------------------------------------------------------------------------------------------

# ModelOpt preset + the algorithm as its diffusers example runs it (examples/diffusers/quantization: INT8 with
# `--quant-algo smoothquant --alpha 0.8`; W4A8 is the preset as shipped, AWQ-lite)
MODELOPT_CONFIGS = {"w8a8-sq": ("INT8_SMOOTHQUANT_CFG", {"method": "smoothquant", "alpha": 0.8}),
                    "w4a8-awq": ("W4A8_AWQ_BETA_CFG", None)}


def _quantizer_entry(preset: dict, suffix: str) -> dict:
    return next(e for e in preset["quant_cfg"] if e.get("quantizer_name") == f"*{suffix}")


def modelopt_config(setting: str, names: Iterable[str]) -> dict:
    """The preset of `setting` with its name filter replaced by the literal quantizer names of `names` (the
    preset's other entries are LLM module names: lm_head, router, ...)."""
    import modelopt.torch.quantization as mtq
    preset_name, algorithm = MODELOPT_CONFIGS[setting]
    preset = copy.deepcopy(getattr(mtq, preset_name))
    wq, iq = _quantizer_entry(preset, "weight_quantizer"), _quantizer_entry(preset, "input_quantizer")
    entries = [{"quantizer_name": "*", "enable": False}]
    for n in names:
        entries += [{**copy.deepcopy(wq), "quantizer_name": f"{n}.weight_quantizer"},
                    {**copy.deepcopy(iq), "quantizer_name": f"{n}.input_quantizer"}]
    return {"quant_cfg": entries, "algorithm": algorithm or preset["algorithm"]}


def _modelopt_bytes(model: nn.Module, names: list[str]) -> int:
    """`mtq.compress` on a copy (real int8 / uint8-packed int4 weights) + the quantizer buffers of the selected
    linears (weight scales, input amax, AWQ / SmoothQuant pre_quant_scale; fp32). The copy is only weighed:
    ModelOpt's compressed int4 forward wants its FP8 CUDA kernel, so the fake-quantized model is what is evaluated
    (same numerics: ModelOpt's fake quant is its reference)."""
    import modelopt.torch.quantization as mtq
    packed = copy.deepcopy(model)
    mtq.compress(packed)
    total = 0
    for n in names:
        m = packed.get_submodule(n)
        w = m.weight
        total += w.data.numel() * w.data.element_size()          # int8 codes / uint8-packed int4 codes
        for q in (*m.weight_quantizer.modules(), m.input_quantizer):
            bufs = dict(q.named_buffers(recurse=False))
            if "_scale" in bufs:      # compress keeps the amax beside the scale it derived; one is stored
                bufs.pop("_amax", None)
            total += sum(b.numel() * b.element_size() for b in bufs.values())
    return total


def apply_modelopt(model: nn.Module, include: Iterable[str], keep: Iterable[str] = (), calibrate=None,
                   setting: str = "w8a8-sq") -> dict:
    """NVIDIA ModelOpt post-training quantization, `mtq.quantize(model, cfg, forward_loop=calibrate)`, in place.

    setting "w8a8-sq": INT8_SMOOTHQUANT_CFG (int8 weights per output channel, int8 per-tensor static inputs) with
    SmoothQuant alpha 0.8 (the diffusers example's INT8 setting). "w4a8-awq": W4A8_AWQ_BETA_CFG (int4 weights
    in blocks of 128 with an FP8 E4M3 second scale, FP8 E4M3 per-tensor static inputs, AWQ-lite search of the
    input scaling). Both are calibrated by `calibrate(model)` (our calibration set, e.g.
    `peers.calibration_runner(path)`), and run as ModelOpt's fake quantization, which is pure PyTorch on CPU.
    """
    import modelopt.torch.quantization as mtq
    if calibrate is None:
        raise ValueError("ModelOpt's static activation scales need `calibrate(model)`")
    targets = _targets(model, include, keep)
    names = [n for n, _ in targets]
    bf16 = _bf16(targets)
    mtq.quantize(model, modelopt_config(setting, names), forward_loop=calibrate)
    got = {n.rsplit(".", 1)[0] for n, m in model.named_modules()
           if n.endswith(("weight_quantizer", "input_quantizer")) and m.is_enabled}
    if got != set(names):
        raise RuntimeError(f"ModelOpt enabled quantizers on {len(got)} linears, expected the {len(names)} selected")
    return {"bytes": _modelopt_bytes(model, names), "bf16_bytes": bf16, "layers": len(names), "setting": setting}


# ---------------------------------------------------------------------------------------------------------------
# HQQ
# ---------------------------------------------------------------------------------------------------------------

def apply_hqq(model: nn.Module, include: Iterable[str], keep: Iterable[str] = (), nbits: int = 4,
              group_size: int = 64) -> dict:
    """HQQ (half-quadratic quantization, calibration-free) on the selected linears: `HQQLinear(linear,
    BaseQuantizeConfig(nbits=4, group_size=64))`, its defaults otherwise (optimize=True: the proximal
    zero-point/scale optimiser; asymmetric, axis 1, zero rounded), compute_dtype fp32, its PyTorch backend on CPU
    (dequantize, then an fp32 linear).

    `bytes`: the packed 4-bit codes (W_q) + the fp32 scale and zero of each group, from the HQQLinear.
    """
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    targets = _targets(model, include, keep)
    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    total = 0
    for name, linear in targets:
        q = HQQLinear(linear, cfg, compute_dtype=torch.float32, device=str(linear.weight.device), del_orig=False)
        set_module(model, name, q)
        total += _storage_bytes(q.W_q) + sum(_storage_bytes(q.meta[k]) for k in ("scale", "zero")
                                             if torch.is_tensor(q.meta.get(k)))
    return {"bytes": total, "bf16_bytes": _bf16(targets), "layers": len(targets), "group_size": group_size}
