"""A compressed transformer measured inside its real pipeline: the original pipeline and the same pipeline with the
artifact as its transformer generate from the same prompts and seeds; the compressed images are scored against
the original's (PSNR and SSIM of the decoded images, the measure SVDQuant and ViDiT-Q report against their 16-bit
models), both transformers are timed per sampling step, and the pairs are written side by side as a PNG grid.
Everything but the transformer (text encoders, VAE, scheduler) is the same objects in both pipelines."""
from __future__ import annotations

import io
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import DicompressError
from .metrics import psnr_db
from .ssim import ssim

DEFAULT_STEPS = 4          # enough to compare two transformers on the same trajectory; not a quality setting
DEFAULT_SIZE = 256


@contextmanager
def timed_calls(module: torch.nn.Module):
    """Times every forward of `module` (wall clock, synchronised on CUDA): yields a list of seconds per call."""
    times: list[float] = []
    start: list[float] = []

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def pre(*_):
        sync()
        start.append(time.perf_counter())

    def post(*_):
        sync()
        times.append(time.perf_counter() - start.pop())

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield times
    finally:
        for h in handles:
            h.remove()


def generate(pipe, prompts: list[str], seed: int, steps: int, height: int, width: int,
             guidance_scale: float | None) -> tuple[torch.Tensor, float]:
    """Images [N, 3, H, W] in [0, 1] (prompt i with seed + i) and the transformer's seconds per sampling step."""
    images, per_step = [], []
    kw = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    pipe(prompts[0], num_inference_steps=1, height=height, width=width, output_type="pt",   # warm-up, not timed
         generator=torch.Generator("cpu").manual_seed(seed), **kw)
    with timed_calls(pipe.transformer) as times:
        for i, prompt in enumerate(prompts):
            n = len(times)
            out = pipe(prompt, num_inference_steps=steps, height=height, width=width, output_type="pt",
                       generator=torch.Generator("cpu").manual_seed(seed + i), **kw)
            images.append(out.images.float().cpu())
            per_step.append(sum(times[n:]) / steps)
    return torch.cat(images).clamp(0, 1), sum(per_step) / len(per_step)


def pair_grid(reference: torch.Tensor, compressed: torch.Tensor, prompts: list[str]) -> bytes:
    """PNG bytes: one row per prompt, the original's image left, the compressed one right, prompt under."""
    from PIL import Image, ImageDraw

    n, _, h, w = reference.shape
    label, pad = 14, 4
    grid = Image.new("RGB", (2 * w + 3 * pad, n * (h + label + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        top = pad + i * (h + label + pad)
        for j, img in enumerate((reference[i], compressed[i])):
            arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            grid.paste(Image.fromarray(arr), (pad + j * (w + pad), top))
        draw.text((pad, top + h + 1), prompts[i][: max(8, (2 * w) // 6)], fill="black")
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def load_pipelines(pipeline_dir: str | Path, transformer_dir: str | Path, dtype=torch.float32, device="cpu"):
    """(original, compressed): the pipeline directory as saved, and the same components with the dicompress
    artifact at `transformer_dir` as the transformer."""
    from diffusers import DiffusionPipeline

    from ..io import load
    with warnings.catch_warnings():     # diffusers 0.42 renames torch_dtype to dtype; 0.35 knows only torch_dtype
        warnings.simplefilter("ignore", FutureWarning)
        original = DiffusionPipeline.from_pretrained(str(pipeline_dir), torch_dtype=dtype).to(device)
    transformer = load(transformer_dir, torch_dtype=dtype).to(device)
    compressed = type(original)(**{**original.components, "transformer": transformer})
    for p in (original, compressed):
        p.set_progress_bar_config(disable=True)
    return original, compressed


def evaluate_pipeline(pipeline_dir: str | Path, transformer_dir: str | Path, prompts: list[str], *, seed: int = 0,
                      steps: int | None = None, height: int | None = None, width: int | None = None,
                      guidance_scale: float | None = None, device="cpu") -> tuple[dict, bytes]:
    """(metrics, grid PNG) of the artifact at `transformer_dir` inside the pipeline at `pipeline_dir`."""
    if not prompts:
        raise DicompressError("no prompts to generate from", hint="give a prompt file: one prompt per line")
    steps, height, width = steps or DEFAULT_STEPS, height or DEFAULT_SIZE, width or DEFAULT_SIZE
    original, compressed = load_pipelines(pipeline_dir, transformer_dir, device=device)
    ref, ref_step = generate(original, prompts, seed, steps, height, width, guidance_scale)
    out, out_step = generate(compressed, prompts, seed, steps, height, width, guidance_scale)
    per_image = ssim(out, ref, data_range=1.0)
    psnrs = [psnr_db(o, r, data_range=1.0) for o, r in zip(out, ref)]
    metrics = {"kind": "pipeline", "pipeline": str(pipeline_dir), "prompts": len(prompts), "seed": seed,
               "steps": steps, "height": height, "width": width,
               "psnr_db": _finite(psnr_db(out, ref, data_range=1.0)),
               "psnr_db_min": _finite(min(psnrs)),
               "ssim": round(float(per_image.mean()), 5), "ssim_min": round(float(per_image.min()), 5),
               "latency_ms_per_step": {"original": round(ref_step * 1e3, 3), "compressed": round(out_step * 1e3, 3)},
               "per_prompt": [{"prompt": p, "psnr_db": _finite(q), "ssim": round(float(s), 5)}
                              for p, q, s in zip(prompts, psnrs, per_image)]}
    return metrics, pair_grid(ref, out, prompts)


def _finite(v: float):
    """JSON has no inf: identical images give PSNR null (and say so by ssim 1.0)."""
    return None if math.isinf(v) else round(v, 3)


def format_pipeline_metrics(m: dict) -> str:
    lat = m["latency_ms_per_step"]
    psnr = "inf (identical)" if m["psnr_db"] is None else f"{m['psnr_db']:.2f} dB (min {m['psnr_db_min']} dB)"
    return "\n".join([
        f"pipeline eval against {m['pipeline']} ({m['prompts']} prompts, seeds {m['seed']}.., {m['steps']} steps, "
        f"{m['height']}x{m['width']}):",
        f"  PSNR vs original:  {psnr}",
        f"  SSIM vs original:  {m['ssim']:.4f} (min {m['ssim_min']:.4f})",
        f"  transformer per step: original {lat['original']:.1f} ms, compressed {lat['compressed']:.1f} ms"])
