"""`dicompress eval` and `dicompress inspect` behind the CLI: an artifact measured against its source model,
and a summary of an artifact or a model directory."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..arch import adapter_for_class
from ..errors import ArtifactError, DicompressError
from ..io import load, verify_artifact
from ..io.names import CONFIG_NAME, MARKER_NAME, REPORT_NAME
from ..io.verify import read_config
from ..models import load_transformer, meta_model, resolve_model
from ..nn.surgery import matches
from .digits_eval import evaluate_digits, layer_sqnr_table
from .summary import format_summary


def evaluate_artifact(artifact: str | Path, samples_per_class: int = 20, steps: int | None = None,
                      progress: bool = True) -> dict:
    """Load an artifact, rebuild its source model, and measure the artifact against it."""
    path = Path(artifact)
    verify_artifact(path)
    qcfg = read_config(path)["quantization_config"]
    source = (qcfg.get("source") or {}).get("model")
    if not source:
        raise DicompressError(f"{path} does not record the model it was made from; cannot evaluate against it")
    info = resolve_model(source)
    student, teacher = load(path), load_transformer(info)
    prev = path / REPORT_NAME
    report = json.loads(prev.read_text()) if prev.exists() else {}
    report.update({"model": source, "output": str(path)})
    if info.is_zoo:
        kw = {"steps": steps} if steps else {}
        metrics, _ = evaluate_digits(student, teacher, info.path, samples_per_class=samples_per_class,
                                     progress=progress, **kw)
        report["metrics"] = metrics
    else:
        report.pop("metrics", None)
    fresh = {r["module"]: r for r in layer_sqnr_table(student, teacher)}
    rows = report.get("layers") or list(fresh.values())
    for row in rows:   # keep what the passes measured; fill in what they did not
        if row.get("sqnr_db") is None and fresh.get(row.get("module"), {}).get("sqnr_db") is not None:
            row["sqnr_db"] = fresh[row["module"]]["sqnr_db"]
    report["layers"] = rows
    return report


def inspect_path(path: str, verify: bool = False) -> str:
    """An artifact's manifest, footprint and report (every weight file's header checked; `verify`: every file's
    SHA-256 too), or a model's architecture, blocks and linears."""
    p = Path(path)
    if p.is_dir() and (p / MARKER_NAME).exists():
        verify_artifact(p)                # refuses it: an interrupted (or running) write
    if p.is_dir() and (p / CONFIG_NAME).exists() and "quantization_config" in read_config(p, require_dicompress=False):
        return _describe_artifact(p, verify)
    if verify:
        raise ArtifactError(f"{path} is not a dicompress artifact: nothing to verify",
                            hint="--verify checks an artifact's files against their recorded SHA-256")
    return _describe_model(path)


def verified_line(summary: dict) -> str:
    """One line saying what `verify_artifact(..., checksums=True)` checked."""
    base = (f"{summary['n_tensors']} tensors in {len(summary['weight_files'])} weight file(s), "
            f"manifest of {summary['manifest_length']} entries, format {summary['format_version']}")
    sums = summary.get("checksums")
    if sums is None:
        return (f"OK {summary['path']}: headers and manifest check out ({base}); it records no checksums "
                f"(written by dicompress {summary.get('dicompress_version') or '(unknown)'}, before checksums were "
                f"recorded), so its bytes were not checked")
    return (f"OK {summary['path']}: {sums['files']} files match their SHA-256 ({sums['bytes'] / 1e6:.1f} MB); "
            f"{base}")


def _describe_artifact(p: Path, verify: bool = False) -> str:
    info = verify_artifact(p, checksums=verify)
    qcfg = read_config(p)["quantization_config"]
    ops = Counter(f"{e['op']} {e.get('codec', '')} w{e['bits']}" if "bits" in e else e["op"]
                  for e in qcfg.get("manifest", []))
    lines = [f"artifact: {p}", f"  format version: {qcfg.get('format_version')}",
             f"  source model:   {(qcfg.get('source') or {}).get('model')}"]
    lines += [f"  {k}: {v}" for k, v in info.items() if k not in ("path", "checksums")]
    if verify:
        lines.append("  verified: " + verified_line(info))
    lines.append("  manifest:")
    lines += [f"    {n:4d} x {op}" for op, n in ops.most_common()]
    rep = p / REPORT_NAME
    if rep.exists():
        lines += ["", format_summary(json.loads(rep.read_text()))]
    return "\n".join(lines)


def _describe_model(path: str) -> str:
    info = resolve_model(path)
    adapter = adapter_for_class(info.class_name)
    model = meta_model(info)          # built on the meta device: no weights are read
    d = adapter.describe(model)
    lin = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = [n for n in lin if matches(n, adapter.quant_include) and not matches(n, adapter.quant_keep)]
    lines = [f"model: {info.name} ({info.path})", f"  class: {info.class_name}  arch: {d['arch']}",
             f"  blocks: {', '.join(f'{v} {k}' for k, v in d['blocks'].items())}",
             f"  parameters: {d['params']:,}",
             f"  linears: {len(lin)}; quantized by default: {len(chosen)} "
             f"(include {list(adapter.quant_include)}, keep {list(adapter.quant_keep)})",
             f"  digits evaluation: {'yes (zoo model)' if info.is_zoo else 'no'}"]
    return "\n".join(lines)
