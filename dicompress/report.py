"""The run report: a typed `Report` built from the passes' records, the footprint and the evaluation.

`Report.to_dict()` is `report.json` (and what `dicompress.run` returns); its keys are those of earlier
versions, with `stages` added for recipes that restructure the model and then go on (quality after each
stage) and `calibration.recaptured` for the captures taken on the restructured model.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

from .eval import (
    bf16_bytes,
    evaluate_digits,
    layer_sqnr_table,
    quantized_linear_bytes,
    save_sample_grid,
    tensor_bytes,
)
from .errors import CalibrationError
from .version import __version__
from .zoo import ZOO_FILES

CALIBRATION_KEYS = ("source", "seeds", "steps", "samples", "rows", "block_inputs")


@dataclass
class Report:
    model: str
    model_class: str
    recipe: str | None
    output: str | None
    device: str
    passes: list[dict]
    layers: list[dict]
    footprint: dict
    seconds: dict[str, float] = field(default_factory=dict)
    # the run's `--set KEY=VALUE` texts: `recipe` names the file, these changed it (the command reruns it)
    overrides: list[str] | None = None
    calibration: dict | None = None
    metrics: dict | None = None
    stages: list[dict] | None = None
    streaming: dict | None = None
    sections: dict[str, Any] = field(default_factory=dict)      # what passes added (depth_analysis ...)
    images: dict | None = field(default=None, repr=False)       # evaluation samples (for samples.png)
    dicompress_version: str = __version__

    def to_dict(self) -> dict:
        out = {"passes": self.passes, "layers": self.layers, **self.sections,
               "dicompress_version": self.dicompress_version, "model": self.model, "model_class": self.model_class,
               "recipe": self.recipe, **({"overrides": self.overrides} if self.overrides else {}),
               "output": self.output, "device": self.device}
        for key in ("calibration", "streaming", "stages"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["footprint"] = self.footprint
        if self.metrics is not None:
            out["metrics"] = self.metrics
        out["seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
        return out


def calibration_summary(store) -> dict | None:
    return None if store is None else {k: store.meta.get(k) for k in CALIBRATION_KEYS}


def _linear_stats(store) -> dict:
    try:
        return store.linear_stats()
    except CalibrationError:       # a store without statistics: nothing to add
        return {}


def attach_activation_stats(rows: list[dict], stats: dict) -> None:
    """Each row's layer input absmax and RMS (as the layer sees them: after smoothing) from `stats`."""
    for row in rows:
        s = stats.get(row.get("module"))
        if s is not None:
            row["act_absmax"] = round(float(s["absmax"].max()), 4)
            row["act_rms"] = round(float(s["rms"].pow(2).mean().sqrt()), 4)


def merge_layer_rows(rows: list[dict]) -> list[dict]:
    """One row per module: each pass adds its own facts (J and transform from ars, eta and SQNR from
    tlq ...); `method` lists the passes in order."""
    merged: dict[str, dict] = {}
    for row in rows:
        name = row.get("module")
        if name not in merged:
            merged[name] = dict(row)
            continue
        m = merged[name]
        method = f"{m.get('method')}+{row['method']}" if row.get("method") and m.get("method") else \
            (m.get("method") or row.get("method"))
        m.update({k: v for k, v in row.items() if v is not None})
        m["method"] = method
    return list(merged.values())


def footprint(model) -> dict:
    q_bytes, q_bf16, n_q = quantized_linear_bytes(model)
    total, total_bf16 = tensor_bytes(model), bf16_bytes(model)
    return {"bytes_total": total, "bytes_total_bf16": total_bf16,
            "bytes_quantized_linears": q_bytes, "bytes_quantized_linears_bf16": q_bf16, "quantized_linears": n_q,
            "ratio_quantized_linears": round(q_bytes / q_bf16, 4) if q_bf16 else None,
            "ratio_total": round(total / total_bf16, 4) if total_bf16 else None}


def evaluate(model, teacher, info, eval_cfg, progress: bool = True) -> tuple[dict, dict]:
    """Digits quality of `model` against `teacher` (zoo models): (metrics, images)."""
    kw = {"steps": eval_cfg.steps} if eval_cfg.steps else {}
    return evaluate_digits(model, teacher, info.path, samples_per_class=eval_cfg.samples_per_class,
                           seed_base=eval_cfg.seed, progress=progress, **kw)


def build_report(*, model, part: dict, recipe, info, device, timings: dict, store=None, stats_store=None,
                 teacher=None, stages: list[dict] | None = None, recaptured: list[dict] | None = None,
                 progress: bool = True) -> Report:
    """The report of a run: `part` is `records.combine`'s (passes, layers, sections); `store` the recipe's
    capture; `stats_store` the capture whose per-linear statistics reach the layer table (the last stage's;
    None: none, a streamed run attached each block's as it went); `teacher` (a zoo model's, when evaluation
    is on) gives the quality metrics and the layers' weight SQNR; `recaptured` the captures taken on the
    restructured model."""
    part = dict(part)
    passes, layers = part.pop("passes"), merge_layer_rows(part.pop("layers"))
    if stats_store is not None:
        attach_activation_stats(layers, _linear_stats(stats_store))
    calibration = None
    if recipe.calibration is not None and store is not None:
        calibration = calibration_summary(store) | ({"recaptured": recaptured} if recaptured else {})
    rep = Report(model=info.name, model_class=info.class_name, recipe=recipe.source_file, output=recipe.output,
                 device=str(device), passes=passes, layers=layers, footprint=footprint(model),
                 overrides=list(getattr(recipe, "overrides", ())) or None,
                 calibration=calibration, stages=stages or None, sections=part)
    timings = dict(timings)
    if teacher is not None:
        t = time.perf_counter()
        rep.metrics, rep.images = evaluate(model, teacher, info, recipe.eval, progress)
        sq = {r["module"]: r for r in layer_sqnr_table(model, teacher)}
        for row in rep.layers:
            if row.get("module") in sq and row.get("sqnr_db") is None and sq[row["module"]]["sqnr_db"] is not None:
                row["sqnr_db"] = sq[row["module"]]["sqnr_db"]
        timings["eval"] = time.perf_counter() - t
    rep.seconds = timings
    return rep


def artifact_files(files: dict[str, bytes], report: Report, recipe, info) -> dict[str, bytes]:
    """The artifact's extra files: what passes produced (e.g. depth_analysis.png), the sample grid, and for zoo
    models the class-conditioning table and the classifier, so the artifact samples and is evaluated on its own
    (and can be the `model` of another recipe)."""
    files = dict(files)
    images = report.images
    if images is not None and recipe.eval.grid:
        buf = io.BytesIO()
        save_sample_grid(images["teacher"], images["student"], buf, images["labels"], per_class=8)
        files["samples.png"] = buf.getvalue()
    if info.is_zoo:
        for name in ZOO_FILES:
            files[name] = (info.path / name).read_bytes()
    return files

