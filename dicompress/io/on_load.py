"""Quantize on load: `from_pretrained(original, quantization_config=DicompressConfig(passes=[{"rtn": ...}]))`.

Only passes that need no calibration run here: weight-only `tlq` / `rtn` with `gptq: false` (one of them).
diffusers reads the checkpoint tensor by tensor into a meta model (safetensors memory-mapped); each selected
linear stays a meta nn.Linear until its weight arrives, is then quantized at once and replaced by its
QuantLinear, so a full-precision copy exists for one layer at a time. The manifest recorded on the way makes
the loaded model save (save_pretrained) as an ordinary artifact.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..errors import ArtifactError, RecipeError
from ..nn.qlinear import QuantLinear
from ..nn.surgery import iter_linears, set_module
from ..quant.packing import pack_codes

ON_LOAD_PASSES = ("tlq", "rtn")
RTN_CHUNK = 1 << 22          # weights per RTN row chunk (about 150 MB of temporaries)
HINT = ("passes that read calibration data (gptq: true, smooth, ars, act_quant, pruning, distillation) run "
        "with `dicompress run RECIPE.yaml`, which writes an artifact that from_pretrained then loads")


def check_on_load_passes(passes) -> list:
    """The pass objects of an on-load request; RecipeError (with the `dicompress run` hint) otherwise."""
    from ..recipe import build_passes          # lazy: recipes import the pass registry
    if not isinstance(passes, (list, tuple)) or len(passes) != 1:
        raise RecipeError("quantize on load takes exactly one pass: tlq or rtn", key="quantization_config.passes",
                          hint="e.g. DicompressConfig(passes=[{'tlq': {'bits': 4}}]); " + HINT)
    objs = build_passes(list(passes))
    p = objs[0]
    if p.name not in ON_LOAD_PASSES:
        raise RecipeError(f"pass {p.name!r} cannot run while loading (it needs calibration data or a teacher)",
                          key=f"quantization_config.passes[0].{p.name}", hint=HINT)
    if p.config.gptq:
        raise RecipeError("gptq: true reads calibration inputs, which a load does not have",
                          key=f"quantization_config.passes[0].{p.name}.gptq", hint=HINT)
    if p.config.lowrank_rank:   # the loader builds plain QuantLinears: the branch would be silently lost
        raise RecipeError("lowrank_rank is not applied while loading", key=f"quantization_config.passes[0]."
                          f"{p.name}.lowrank_rank", hint="run the recipe with `dicompress run` and load its artifact")
    return objs


def _weight_quantizer(p) -> tuple[str, callable]:
    if p.name == "tlq":
        from ..quant.tlq import DEFAULT_ETAS, DEFAULT_PERCENTILES, TLQ_CODEC, tlq_quantize
        c = p.config
        return TLQ_CODEC.name, partial(tlq_quantize, etas=c.etas or DEFAULT_ETAS,
                                       percentiles=c.percentiles or DEFAULT_PERCENTILES)
    from ..quant.uniform import UNIFORM_CODEC, rtn_quantize
    return UNIFORM_CODEC.name, rtn_quantize


class OnLoadQuantizer:
    """The targets of one weight-quant pass on the meta model, quantized as their weights arrive."""

    def __init__(self, model: nn.Module, passes: list[dict]):
        from ..arch import adapter_for
        (p,) = check_on_load_passes(passes)
        self.pass_name, self.config = p.name, p.config
        self.codec, self.quantize = _weight_quantizer(p)
        adapter = adapter_for(model)
        include = p.config.include if p.config.include is not None else adapter.quant_include
        keep = p.config.keep if p.config.keep is not None else adapter.quant_keep
        self.targets = {f"{n}.weight": n for n, _ in iter_linears(model, include, keep)}
        if not self.targets:
            raise RecipeError(f"no linear matches include {list(include)} minus keep {list(keep)}",
                              key=f"quantization_config.passes[0].{p.name}.include")
        self.order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        self.entries: dict[str, dict] = {}

    def claims(self, param_name: str) -> bool:
        return param_name in self.targets

    def quantize_weight(self, model: nn.Module, param_name: str, weight: torch.Tensor, device,
                        bias_dtype: torch.dtype | None) -> None:
        """Replace the (meta) linear owning `param_name` by its QuantLinear, codes from `weight`."""
        name = self.targets[param_name]
        linear = model.get_submodule(name)
        dev = torch.device(device) if not isinstance(device, torch.device) else device
        has_bias = linear.bias is not None
        bias_dtype = bias_dtype or (linear.bias.dtype if has_bias else torch.float32)
        bits, gs = self.config.bits, self.config.effective_group_size
        q = QuantLinear(linear.in_features, linear.out_features, has_bias, self.codec, bits, gs, device=dev,
                        bias_dtype=bias_dtype)
        # RTN treats rows independently: row chunks give the same codes with temporaries of one chunk. TLQ
        # searches its eta over the whole layer, so it takes the layer at once.
        step = max(1, RTN_CHUNK // linear.in_features) if self.pass_name == "rtn" else linear.out_features
        with torch.no_grad():
            for r0 in range(0, linear.out_features, step):
                rows = slice(r0, r0 + step)
                codes, buffers, _ = self.quantize(weight[rows].to(dev, torch.float32), bits, gs)
                q.qweight[rows] = pack_codes(codes, bits)
                for n, t in buffers.items():
                    if t.dim() == 0 or t.shape[0] != codes.shape[0]:     # a per-layer value (TLQ's eta)
                        getattr(q, n).copy_(t)
                    else:
                        getattr(q, n)[rows] = t
                del codes, buffers
            if has_bias:
                if linear.bias.is_meta:     # diffusers sets it when the checkpoint's bias comes
                    q.bias = nn.Parameter(torch.empty_like(linear.bias, device="meta", dtype=bias_dtype),
                                          requires_grad=False)
                else:
                    q.bias.copy_(linear.bias)
        set_module(model, name, q)
        self.entries[name] = q.manifest_entry(name)

    def manifest(self) -> list[dict]:
        """Entries in model order (tensors arrive in checkpoint order); every target must have been quantized."""
        missing = sorted(set(self.targets.values()) - set(self.entries))
        if missing:
            raise ArtifactError(f"{len(missing)} linears selected for quantization had no weight in the checkpoint, "
                                f"e.g. {missing[:3]}", hint="the checkpoint is incomplete or of another model")
        return [self.entries[n] for n in sorted(self.entries, key=self.order.__getitem__)]
