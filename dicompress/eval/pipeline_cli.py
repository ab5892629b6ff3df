"""`dicompress eval ARTIFACT --pipeline DIR --prompts FILE`: the artifact inside the original pipeline, against it."""
from __future__ import annotations

from pathlib import Path

from ..calib.sources import read_prompts
from ..errors import DicompressError
from .pipeline_check import GRID_NAME
from .pipeline_eval import evaluate_pipeline, format_pipeline_metrics


class MissingInput(DicompressError):
    exit_code = 2


def evaluate_with_pipeline(artifact: str, pipeline_dir: str | None, prompts: str | None, *, seed: int = 0,
                           steps: int | None = None, height: int | None = None, width: int | None = None,
                           grid: str | None = None) -> tuple[dict, str]:
    """(metrics, text) of the artifact at `artifact` (a transformer artifact directory) in `pipeline_dir`; the
    side-by-side grid is written to `grid` (default pipeline_eval.png here)."""
    if not pipeline_dir or not prompts:
        missing = "--prompts FILE" if pipeline_dir else "--pipeline DIR"
        raise MissingInput(f"a pipeline evaluation needs both --pipeline and --prompts; {missing} is missing",
                           hint="--pipeline: the original diffusers pipeline directory (model_index.json); "
                                "--prompts: a text file, one prompt per line")
    if not (Path(pipeline_dir) / "model_index.json").is_file():
        raise MissingInput(f"{pipeline_dir} is not a diffusers pipeline directory (no model_index.json)",
                           hint="--pipeline takes the original pipeline: model_index.json, transformer/, vae/ ...")
    texts = read_prompts(prompts)
    if not texts:
        raise MissingInput(f"{prompts} holds no prompt", hint="one prompt per line; blank lines and # comments "
                                                              "are skipped")
    metrics, png = evaluate_pipeline(pipeline_dir, artifact, texts, seed=seed, steps=steps, height=height,
                                     width=width)
    out = Path(grid or GRID_NAME)
    out.write_bytes(png)
    metrics["grid"] = str(out)
    return metrics, format_pipeline_metrics(metrics) + f"\n  grid (original | compressed): {out}"
