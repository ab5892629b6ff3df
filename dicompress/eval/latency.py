"""Wall time of one transformer forward (= one sampling step) at the embedded model's token grid."""
from __future__ import annotations

import statistics
import time

import torch

from ..zoo.digits import CHANNELS, SIZE, image_ids, pack

FIXED_TIMESTEP = 0.5  # FLUX takes sigma in [0, 1]; the cost of a forward does not depend on it


def step_inputs(transformer, conditioning, batch: int = 16, seed: int = 0) -> dict:
    """Keyword arguments for one forward, packed exactly as FluxPipeline packs them."""
    param = next(transformer.parameters())
    dtype, device = param.dtype, param.device
    g = torch.Generator().manual_seed(seed)
    latents = pack(torch.randn(batch, CHANNELS, SIZE, SIZE, generator=g))   # [B, 64, 4]
    classes = torch.arange(batch) % conditioning.prompt_embeds.shape[0]
    txt, pooled = conditioning.for_classes(classes)
    kw = dict(hidden_states=latents, encoder_hidden_states=txt, pooled_projections=pooled,
              timestep=torch.full((batch,), FIXED_TIMESTEP), img_ids=image_ids(),
              txt_ids=torch.zeros(txt.shape[1], 3))
    if getattr(getattr(transformer, "config", None), "guidance_embeds", False):
        kw["guidance"] = torch.full((batch,), 3.5)
    kw = {k: v.to(device, dtype) for k, v in kw.items()}
    return dict(kw, return_dict=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency_ms_per_step(transformer, conditioning, batch: int = 16, warmup: int = 2, repeats: int = 5) -> float:
    """Median milliseconds of one forward over `repeats` timed calls, after `warmup` untimed ones.

    The median (not the mean) because the CPU is shared and the odd slow call is noise, not cost.
    """
    kw = step_inputs(transformer, conditioning, batch)
    device = kw["hidden_states"].device
    for _ in range(warmup):
        transformer(**kw)
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        transformer(**kw)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def latency_ratio(student, teacher, conditioning, rounds: int = 5) -> float:
    """Median over `rounds` of student/teacher time per forward, the two timed back to back in each round (the
    CPU is shared: a slow spell hits both sides of a ratio, not one model's whole measurement)."""
    ratios = []
    for _ in range(rounds):
        s = latency_ms_per_step(student, conditioning, repeats=3)
        t = latency_ms_per_step(teacher, conditioning, repeats=3)
        ratios.append(s / t)
    return statistics.median(ratios)
