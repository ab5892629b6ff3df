"""`dicompress run RECIPE --dry-run`: everything a run checks before its work, and what it would do, without
loading a weight: the recipe (schema, passes, order rules), the environment settings, the model (its directory
and class, from config.json), the calibration (source, samples, what the capture holds, the cache), the pipeline
evaluation's prompts, the passes' checks on the model's shapes (on the meta device, only for passes that have
them), the output. Imports torch and pydantic, not diffusers (unless a pass checks shapes on the model)."""
from __future__ import annotations

import os
from pathlib import Path

from .calib.sources import calls_per_step
from .calibrate import cache_root, capture_what, check_calibration, original_readers
from .errors import ArtifactError, SettingsError
from .eval.pipeline_check import check_pipeline_eval
from .kernels.dispatch import check_settings
from .models import resolve_model
from .passes import Pass
from .passes.catalog import pass_doc
from .recipe import Recipe


def plan(recipe: Recipe) -> dict:
    """What `run` would do with `recipe`, after every check it makes before work (raising what it would raise)."""
    passes = recipe.pass_objects()
    try:
        check_settings()
    except ValueError as e:
        raise SettingsError(str(e), hint="DICOMPRESS_KERNELS: auto | reference; DICOMPRESS_GEMM_MODE: auto | "
                                         "decode | int8 | int8_unpacked (README, Kernels)") from None
    info = resolve_model(recipe.model)
    check_calibration(recipe, info)
    pipeline_eval = check_pipeline_eval(recipe, info)
    if any(p.checks_model() for p in passes):
        from .pipeline import _check_on_model     # lazy: the model's module tree on the meta device needs diffusers
        _check_on_model(passes, info, recipe.source_file)
    out = Path(recipe.output)
    if out.exists() and not recipe.overwrite:
        raise ArtifactError(f"output {out} already exists", hint="choose another --output, delete it, or set "
                            "`overwrite: true` in the recipe")
    return {"recipe": recipe.source_file, "model": info.as_dict() | {"zoo": info.is_zoo},
            "calibration": _calibration(recipe, passes, info),
            "passes": [{"name": p.name, "doc": pass_doc(type(p)), "config": p.config.model_dump(mode="json")}
                       for p in passes],
            "streaming": _streams(passes, recipe.streaming.enabled),
            "eval": {"digits": bool(recipe.eval.enabled and info.is_zoo), "pipeline": pipeline_eval},
            "output": str(out), "overwrite": bool(out.exists())}


def _streams(passes: list[Pass], enabled) -> bool:
    """stream.check_streamable's answer. That module imports the whole streaming path (diffusers' pipelines
    among it), so it is asked only where it can refuse (`enabled: true`); auto is its one-line rule."""
    if enabled is True:
        from .stream import check_streamable
        return check_streamable(passes, enabled)
    return enabled == "auto" and all(p.streamable for p in passes) and int(os.environ.get("WORLD_SIZE", "1")) <= 1


def _calibration(recipe: Recipe, passes: list[Pass], info) -> dict | None:
    cfg = recipe.calibration
    if cfg is None:
        return None
    per = calls_per_step(cfg, info.as_dict())
    what = capture_what(cfg, original_readers(passes))
    return {"source": cfg.source, "seeds": list(cfg.seeds), "steps": cfg.steps,
            "model_calls_per_step": per[0] if per else None, "samples": per[1] if per else None,
            "holds": {False: "per-linear statistics", "model_inputs:per_call": "statistics + model inputs"}.get(
                what, "statistics + every block's inputs"),
            "cache": str(cache_root(recipe))}


def format_plan(p: dict) -> str:
    m, lines = p["model"], []
    lines.append(f"recipe {p['recipe']}: OK (dry run: nothing loaded, nothing written)")
    lines.append(f"  model:       {m['name']} -> {m['path']} ({m['class']}"
                 + (f", pipeline {m['pipeline_root']}" if m["pipeline_root"] else "") + ")")
    c = p["calibration"]
    if c is None:
        lines.append("  calibration: none")
    else:
        size = f", {c['samples']} samples, {c['model_calls_per_step']} model calls per step" if c["samples"] else ""
        lines.append(f"  calibration: {c['source']}, seeds {c['seeds']}, {c['steps']} steps{size}; holds "
                     f"{c['holds']}; cache {c['cache']}")
    for i, ps in enumerate(p["passes"]):
        keys = ", ".join(f"{k}={v}" for k, v in ps["config"].items())
        lines.append(f"  passes[{i}]:   {ps['name']} ({keys})")
    lines.append(f"  streaming:   {'yes (one block at a time)' if p['streaming'] else 'no (whole model)'}")
    ev = p["eval"]
    pe = ev["pipeline"]
    what = (["digits (PSNR, class accuracy, Frechet vs the uncompressed model)"] if ev["digits"] else []) \
        + ([f"pipeline ({pe['prompts']} prompts, PSNR / SSIM vs {pe['pipeline']})"] if pe else [])
    lines.append(f"  eval:        {', '.join(what) or 'none'}")
    lines.append(f"  output:      {p['output']}" + (" (exists: overwrite)" if p["overwrite"] else ""))
    return "\n".join(lines)
