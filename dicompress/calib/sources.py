"""Calibration sources: run a real sampling loop (or random inputs) under capture hooks.

- classes:    the embedded digits model; its per-class conditioning table x seeds, FluxPipeline loop.
- embeddings: a safetensors file of precomputed prompt_embeds / pooled_prompt_embeds, same loop.
- prompts:    a text file of prompts, encoded once by the pipeline's own text encoders (prompt_encoding.py,
              before the capture), then sampled from the embeddings with the transformer alone in the
              family's pipeline (FluxPipeline, QwenImagePipeline); streamed or not.
- synthetic:  random latents and text embeddings of the right shapes, a spread of timesteps;
              plumbing-grade (data-free, fine for weight-only quantization, not for activations).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..errors import CalibrationError
from ..zoo import CONDITIONING_NAME, Conditioning, load_conditioning
from .capture import Capture, StopForward, chunked_blocks
from .config import CalibrationConfig
from .store import CalibrationStore, StoreWriter


def capture(model, adapter, cfg, model_info: dict, out_dir: str | Path, block_inputs: bool,
            progress: bool = True, first_block_only: bool = False, model_inputs: bool = False) -> CalibrationStore:
    """Run `cfg.source` over `model` with hooks; returns the finished store at `out_dir`.

    `block_inputs`: every block's inputs (and the model inputs with them). `model_inputs` alone: the
    transformer's own inputs at every call and the linear statistics, nothing per block (what end-to-end
    passes read, a small fraction of the block inputs' size).
    `first_block_only` (the streaming pipeline): the model inputs and the first block's inputs, no linear
    statistics; the later blocks' inputs and statistics are computed block by block from these."""
    blocks = [b.name for b in adapter.blocks(model)]
    meta = {"source": cfg.source, "model": model_info.get("name"), "seeds": list(cfg.seeds), "steps": cfg.steps,
            "blocks": blocks, "block_inputs": block_inputs or first_block_only, "first_block_only": first_block_only,
            "model_inputs": bool(model_inputs or block_inputs or first_block_only),
            # what `capture_trajectories` needs to run the same sampling loop again on another model
            "config": cfg.model_dump(mode="json"),
            "model_info": {k: (str(v) if v is not None else None) for k, v in model_info.items()}}
    writer = StoreWriter(out_dir, meta)
    run = {"classes": _run_table, "embeddings": _run_table, "prompts": _run_prompts,
           "synthetic": _run_synthetic}[cfg.source]
    only = blocks[:1] if first_block_only else None
    # data-free inputs are not a trajectory: nothing needs the model's outputs, so the forward stops there
    stop = first_block_only and cfg.source == "synthetic"
    cap = Capture(model, adapter, writer, block_inputs=block_inputs or first_block_only,
                  model_inputs=meta["model_inputs"], linear_stats=not first_block_only, only_blocks=only,
                  stop_early=stop, chunk_rows=cfg.block_batch, store_dtype=getattr(torch, cfg.store_dtype))
    with torch.no_grad(), cap, chunked_blocks(model, adapter, cfg.block_batch):
        extra = run(model, adapter, cfg, model_info, cap, progress)
    return writer.finish(**extra)


def capture_trajectories(model, adapter, meta: dict, out_dir: str | Path, progress: bool = True) -> CalibrationStore:
    """The sampling loop a store was captured with (`meta`: its meta.json), run again on `model` (e.g. a pruned
    student): its own trajectories' model inputs, nothing else. Reuses a finished capture at `out_dir`."""
    if (Path(out_dir) / "meta.json").exists():
        return CalibrationStore(out_dir)
    if "config" not in meta:
        raise CalibrationError("this calibration store does not record its capture settings (it was captured by an "
                               "older dicompress), so the sampling loop cannot be run on the student",
                               hint="delete the calibration cache entry and run again")
    cfg = CalibrationConfig(**meta["config"])
    if cfg.source == "synthetic":
        raise CalibrationError("student trajectories need a sampling loop; calibration source 'synthetic' has none",
                               hint="use source: classes, embeddings or prompts, or set student_trajectories: 0")
    info = {k: (Path(v) if k in ("path", "pipeline_root") and v else v) for k, v in meta["model_info"].items()}
    return capture(model, adapter, cfg, info, out_dir, block_inputs=False, progress=progress, first_block_only=True)


def read_prompts(path: str | Path) -> list[str]:
    """A prompt file's prompts: one per line, blank lines and `#` comments skipped."""
    return [p.strip() for p in Path(path).read_text().splitlines() if p.strip() and not p.startswith("#")]


def calls_per_step(cfg, model_info: dict) -> tuple[int, int] | None:
    """(model calls per sampling step, samples) the capture of `cfg` makes; None for data-free inputs (no
    trajectory). Cheap: reads a table's header or a prompt file, never the model."""
    if cfg.source == "synthetic":
        return None
    if cfg.source == "prompts":
        prompts = read_prompts(cfg.prompts)
        per_seed = -(-len(prompts) // cfg.batch_size)
        return per_seed * len(cfg.seeds), len(prompts) * len(cfg.seeds)
    path = Path(cfg.embeddings) if cfg.source == "embeddings" else Path(model_info["path"]) / CONDITIONING_NAME
    with safe_open(str(path), "pt") as f:
        rows = f.get_slice("prompt_embeds").get_shape()[0]
    samples = (len(cfg.classes) if cfg.classes is not None else rows) * len(cfg.seeds)
    return -(-samples // cfg.batch_size), samples


def _table(cfg, model_info):
    if cfg.source == "embeddings":
        t = load_file(cfg.embeddings)
        return Conditioning(t["prompt_embeds"], t["pooled_prompt_embeds"])
    return load_conditioning(model_info["path"])


def _run_table(model, adapter, cfg, model_info, cap, progress):
    from ..zoo.sampler import make_pipeline, sample  # lazy: loads diffusers' pipelines (seconds)
    table = _table(cfg, model_info)
    rows = list(cfg.classes) if cfg.classes is not None else list(range(table.prompt_embeds.shape[0]))
    pairs = [(c, s) for s in cfg.seeds for c in rows]
    pipe = make_pipeline(model)
    bar = tqdm(total=len(pairs), desc="calibration", unit="sample", disable=not progress)
    for i in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[i:i + cfg.batch_size]
        sample(model, table, [c for c, _ in chunk], [s for _, s in chunk], steps=cfg.steps, pipeline=pipe,
               batch_size=len(chunk))
        bar.update(len(chunk))
    bar.close()
    return {"classes": rows, "samples": len(pairs), "rows": len(pairs) * cfg.steps}


def _run_prompts(model, adapter, cfg, model_info, cap, progress):
    """Sample from the prompts' embeddings (encoded beforehand by the pipeline's text encoders alone:
    prompt_encoding.prompt_embeddings, recorded in `model_info`) with the transformer alone, in the family's
    own pipeline; the transformer may be streamed (meta but for the block running)."""
    from .prompt_encoding import PromptEmbeddings, sampling_pipeline  # lazy: diffusers' pipelines load in seconds
    path = model_info.get("prompt_embeddings")
    if not path:
        raise CalibrationError("calibration source 'prompts' samples from the prompts' embeddings, and none were "
                               "given to this capture", hint="run it through `dicompress run` (or "
                               "dicompress.calibrate.recipe_store), which encodes the prompts first")
    emb = PromptEmbeddings(path)
    pipe = sampling_pipeline(model, model_info["pipeline_root"], emb.family)
    param = next(model.parameters())
    rows = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
            for k, v in emb.rows(cfg.batch_size).items()}
    n = len(emb.prompts)
    bar = tqdm(total=n * len(cfg.seeds), desc="calibration", unit="prompt", disable=not progress)
    for seed in cfg.seeds:
        for i in range(0, n, cfg.batch_size):
            chunk = {k: v[i:i + cfg.batch_size] for k, v in rows.items()}
            gen = torch.Generator("cpu").manual_seed(seed)
            pipe(**emb.family.call_kwargs(pipe, chunk, cfg, emb.max_len), num_inference_steps=cfg.steps,
                 height=cfg.height, width=cfg.width, generator=gen, output_type="latent")
            bar.update(min(cfg.batch_size, n - i))
    bar.close()
    return {"prompts": n, "samples": n * len(cfg.seeds), "rows": n * len(cfg.seeds) * cfg.steps,
            "prompt_embeddings": str(path)}


def _run_synthetic(model, adapter, cfg, model_info, cap, progress):
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    sigmas = torch.linspace(1.0, 1.0 / cfg.steps, cfg.steps)
    bar = tqdm(total=len(cfg.seeds) * cfg.steps, desc="calibration (synthetic)", unit="step", disable=not progress)
    for seed in cfg.seeds:
        gen = torch.Generator().manual_seed(seed)
        kwargs = adapter.synthetic_inputs(model, cfg.batch_size, gen)
        kwargs = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                  (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        for s in sigmas:
            kwargs["timestep"] = torch.full((cfg.batch_size,), float(s), device=device, dtype=dtype)
            try:
                model(**kwargs, return_dict=False)
            except StopForward:
                cap.flush()
            bar.update(1)
    bar.close()
    return {"samples": len(cfg.seeds) * cfg.batch_size, "rows": len(cfg.seeds) * cfg.batch_size * cfg.steps}
