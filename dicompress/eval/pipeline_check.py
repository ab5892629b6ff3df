"""The pipeline evaluation a recipe asks for (`eval.prompts`), checked before any work and run after the artifact
is written. Light: the check reads files only; the evaluation (eval/pipeline_eval.py) is imported when it runs."""
from __future__ import annotations

import json
from pathlib import Path

from ..calib.sources import read_prompts
from ..errors import RecipeError
from ..io.names import REPORT_NAME

GRID_NAME = "pipeline_eval.png"


def _pipeline_dir(recipe, info) -> Path | None:
    ev = recipe.eval
    return Path(ev.pipeline) if ev.pipeline else info.pipeline_root


def check_pipeline_eval(recipe, info) -> dict | None:
    """What the run's pipeline evaluation will use ({pipeline, prompts}), None when the recipe asks for none;
    RecipeError when it cannot run (no pipeline to compare with, no prompt in the file)."""
    ev = recipe.eval
    if not (ev.enabled and ev.prompts):
        return None
    pipe = _pipeline_dir(recipe, info)
    file = recipe.source_file
    if pipe is None:
        raise RecipeError("eval.prompts generates with the original and the compressed pipeline, but the model "
                          f"{info.name} is a transformer alone", file=file, key="eval.pipeline",
                          hint="set eval.pipeline to the original pipeline directory (model_index.json), or make "
                               "the recipe's model that pipeline directory")
    if not (pipe / "model_index.json").is_file():
        raise RecipeError(f"{pipe} is not a diffusers pipeline directory (no model_index.json)", file=file,
                          key="eval.pipeline", hint="the original pipeline: model_index.json, transformer/, vae/ ...")
    prompts = read_prompts(ev.prompts)
    if not prompts:
        raise RecipeError(f"{ev.prompts} holds no prompt", file=file, key="eval.prompts",
                          hint="one prompt per line; blank lines and # comments are skipped")
    return {"pipeline": str(pipe), "prompts": len(prompts)}


def run_pipeline_eval(recipe, info, echo=print) -> dict:
    """After the run wrote its output: the pipeline evaluation, added to the artifact's report.json (not
    checksummed) with its grid beside it (eval.grid). Returns the metrics."""
    from ..io.verify import artifact_root
    from .pipeline_eval import evaluate_pipeline, format_pipeline_metrics   # lazy: loads diffusers' pipelines
    ev = recipe.eval
    root = artifact_root(recipe.output)
    metrics, png = evaluate_pipeline(_pipeline_dir(recipe, info), root, read_prompts(ev.prompts), seed=ev.seed,
                                     steps=ev.steps, height=ev.height, width=ev.width,
                                     guidance_scale=ev.guidance_scale)
    if ev.grid:
        (root / GRID_NAME).write_bytes(png)
        metrics["grid"] = str(root / GRID_NAME)
    report_path = root / REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["pipeline_eval"] = metrics
    report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    echo(format_pipeline_metrics(metrics))
    return metrics
