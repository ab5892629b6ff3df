"""The run report (metrics, footprint, per-layer table) and writing the run's artifact."""
from __future__ import annotations

import io
import time
from pathlib import Path

from . import __version__


def _layer_activation_stats(state) -> None:
    """Attach each layer's calibration input statistics (absmax, RMS) to its row of the layer table."""
    if state.calibration is None:
        return
    from .errors import CalibrationError
    try:
        stats = state.calibration.linear_stats()
    except CalibrationError:   # a store without statistics: nothing to add
        return
    attach_activation_stats(state.report["layers"], stats)


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


def build_report(state, recipe, info, passes, progress=True, timings=None) -> dict:
    from .eval import bf16_bytes, evaluate_digits, layer_sqnr_table, quantized_linear_bytes, tensor_bytes

    rep = state.report
    rep.update({"dicompress_version": __version__, "model": info.name, "model_class": info.class_name,
                "recipe": recipe.source_file, "output": recipe.output, "device": str(state.device)})
    if recipe.calibration is not None and state.calibration is not None:
        rep["calibration"] = {k: state.calibration.meta.get(k) for k in
                              ("source", "seeds", "steps", "samples", "rows", "block_inputs")}
    rep["layers"] = merge_layer_rows(rep["layers"])
    _layer_activation_stats(state)
    q_bytes, q_bf16, n_q = quantized_linear_bytes(state.model)
    total, total_bf16 = tensor_bytes(state.model), bf16_bytes(state.model)
    rep["footprint"] = {"bytes_total": total, "bytes_total_bf16": total_bf16,
                        "bytes_quantized_linears": q_bytes, "bytes_quantized_linears_bf16": q_bf16,
                        "quantized_linears": n_q,
                        "ratio_quantized_linears": round(q_bytes / q_bf16, 4) if q_bf16 else None,
                        "ratio_total": round(total / total_bf16, 4) if total_bf16 else None}
    timings = dict(timings or {})
    if recipe.eval.enabled and info.is_zoo:
        t = time.perf_counter()
        teacher = state.teacher
        kw = {"steps": recipe.eval.steps} if recipe.eval.steps else {}
        metrics, images = evaluate_digits(state.model, teacher, info.path,
                                          samples_per_class=recipe.eval.samples_per_class,
                                          seed_base=recipe.eval.seed, progress=progress, **kw)
        rep["metrics"] = metrics
        rep["_images"] = images
        sq = {r["module"]: r for r in layer_sqnr_table(state.model, teacher)}
        for row in rep["layers"]:
            if row.get("module") in sq and row.get("sqnr_db") is None and sq[row["module"]]["sqnr_db"] is not None:
                row["sqnr_db"] = sq[row["module"]]["sqnr_db"]
        timings["eval"] = time.perf_counter() - t
    rep["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    return rep


def artifact_files(state, recipe, info, report) -> dict[str, bytes]:
    """The artifact's extra files: what passes produced (e.g. depth_analysis.png), the sample grid, and for zoo
    models the class-conditioning table, so the artifact samples on its own."""
    from .eval import save_sample_grid

    files: dict[str, bytes] = dict(state.files)
    images = report.pop("_images", None)
    if images is not None and recipe.eval.grid:
        buf = io.BytesIO()
        save_sample_grid(images["teacher"], images["student"], buf, images["labels"], per_class=8)
        files["samples.png"] = buf.getvalue()
    if info.is_zoo:
        files["conditioning.safetensors"] = (info.path / "conditioning.safetensors").read_bytes()
    return files


def write_run_artifact(state, recipe, info, report, progress=True, save_dtype=None) -> Path:
    from .eval import dir_bytes
    from .io import write_artifact

    files = artifact_files(state, recipe, info, report)
    t = time.perf_counter()
    out = Path(recipe.output)
    source = {"model": info.name, "class": info.class_name, "recipe": recipe.source_file}
    write_artifact(state.model, out, manifest=state.manifest, report=report, source=source, files=files,
                   overwrite=recipe.overwrite, save_dtype=save_dtype)
    report["footprint"]["bytes_on_disk"] = dir_bytes(out)
    report["seconds"]["write"] = round(time.perf_counter() - t, 2)
    return out
