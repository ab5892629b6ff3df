"""Intel AutoRound (SignRound: signed-gradient tuning of the rounding and the clipping of each block's weights
against the block's full-precision output) on a FluxTransformer2DModel, through AutoRound's own diffusion path.

AutoRound drives a diffusers pipeline and hooks the transformer blocks to cache their inputs. Its documented hook
for pipelines it does not know, `pipe._autoround_pipeline_fn(pipe, prompts, num_inference_steps=..., ...)`, and a
dataset given as an iterable of (ids, prompts) batches, let it run on dicompress' calibration set: each "prompt"
is a (class, seed) pair sampled by the model's real FluxPipeline loop (`dicompress.zoo.sampler.sample`), every
denoising step's block inputs cached.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from dicompress.nn.surgery import iter_linears


def _pipeline_fn(cond):
    from dicompress.zoo.sampler import sample

    def run(pipe, prompts, num_inference_steps=16, **_):
        # guidance_scale / generator: unused, the noise is fixed per seed and the model is not guidance-distilled
        sample(pipe.transformer, cond, [c for c, _ in prompts], [s for _, s in prompts],
               steps=num_inference_steps, pipeline=pipe)
    return run


def apply_autoround(model: nn.Module, include: Iterable[str], keep: Iterable[str], model_path,
                    classes=range(10), seeds=(0, 1), steps: int = 16, iters: int = 200, batch_size: int = 8,
                    scheme: str = "W4A16") -> dict:
    """AutoRound `scheme` (W4A16: symmetric int4, group 128) on the selected linears of `model`, in place.

    `AutoRound(pipe, scheme, dataset=<our (class, seed) batches>, iters, nsamples=len(classes x seeds),
    batch_size, calib_num_inference_steps=steps, device_map="cpu", layer_config=...)`, then `.quantize()`:
    AutoRound walks the transformer blocks (transformer_blocks, single_transformer_blocks) and tunes every linear in
    them; the block linears outside our selection (the AdaLayerNorm modulation linears) are given `{"bits": 16}` in
    `layer_config`, and the tuned set is checked to be exactly our selection. iters 200 and batch_size 8 are
    AutoRound's defaults (lr 1/iters, sign gradient). The linears then hold AutoRound's quantize-dequantized
    weights (what its export packs), so the model runs as is on CPU.

    `bytes`: the int4 codes at 4 bits each + AutoRound's per-group scale (fp16) and zero point when it is a tensor
    (symmetric int4 keeps the constant 8), from the quantized modules.
    """
    from auto_round import AutoRound

    from dicompress.zoo import load_conditioning
    from dicompress.zoo.sampler import make_pipeline

    targets = list(iter_linears(model, include, keep))
    if not targets:
        raise ValueError(f"no nn.Linear matches include {list(include)} minus keep {list(keep)}")
    names = {n for n, _ in targets}
    bf16 = sum(lin.weight.numel() * 2 for _, lin in targets)
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    outside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(blocks)
               and n not in names]
    pipe = make_pipeline(model)
    pipe._autoround_pipeline_fn = _pipeline_fn(load_conditioning(model_path))
    pairs = [(c, s) for s in seeds for c in classes]           # the order of dicompress.calib.sources
    data = [(list(range(i, i + batch_size)), pairs[i:i + batch_size]) for i in range(0, len(pairs), batch_size)]
    ar = AutoRound(pipe, scheme=scheme, dataset=data, iters=iters, nsamples=len(pairs), batch_size=batch_size,
                   calib_num_inference_steps=steps, device_map="cpu",
                   layer_config={n: {"bits": 16} for n in outside})
    with torch.enable_grad():
        ar.quantize()
    got = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and getattr(m, "bits", 16) < 16}
    if got != names:
        raise RuntimeError(f"AutoRound quantized {len(got)} linears, expected the {len(names)} selected "
                           f"(extra {sorted(got - names)[:4]}, missing {sorted(names - got)[:4]})")
    total = 0
    for n in names:
        m = model.get_submodule(n)
        total += (m.weight.numel() * m.bits + 7) // 8
        total += sum(t.numel() * t.element_size() for t in (m.scale, m.zp) if torch.is_tensor(t))
    return {"bytes": total, "bf16_bytes": bf16, "layers": len(names), "iters": iters, "batch_size": batch_size,
            "group_size": model.get_submodule(next(iter(names))).group_size}
