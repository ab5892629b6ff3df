"""`dicompress eval` and `dicompress inspect` behind the CLI: an artifact measured against its source model,
and a summary of an artifact or a model directory."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..arch import adapter_for_class
from ..errors import ArtifactError, DicompressError, ModelError
from ..io import load, verify_artifact
from ..io.names import CONFIG_NAME, MARKER_NAME, REPORT_NAME
from ..io.verify import read_config
from ..models import load_transformer, meta_model, resolve_model
from ..nn.surgery import matches
from .digits_eval import evaluate_digits, layer_sqnr_table
from .summary import format_summary


class NoMetric(DicompressError):
    """`eval` has nothing to measure with: said, with a non-zero exit (2: the input is missing)."""

    exit_code = 2


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
    if not info.is_zoo:
        raise NoMetric(f"no quality metric for {path}: its model {source} is not the embedded digits model, whose "
                       "metrics eval computes without more input",
                       hint=f"give the original pipeline and prompts: dicompress eval {path} --pipeline "
                            f"{info.pipeline_root or 'PIPELINE_DIR'} --prompts PROMPTS.txt (PSNR / SSIM of the "
                            "images vs the original's)")
    student, teacher = load(path), load_transformer(info)
    prev = path / REPORT_NAME
    report = json.loads(prev.read_text()) if prev.exists() else {}
    report.update({"model": source, "output": str(path)})
    kw = {"steps": steps} if steps else {}
    report["metrics"], _ = evaluate_digits(student, teacher, info.path, samples_per_class=samples_per_class,
                                           progress=progress, **kw)
    fresh = {r["module"]: r for r in layer_sqnr_table(student, teacher)}
    rows = report.get("layers") or list(fresh.values())
    for row in rows:   # keep what the passes measured; fill in what they did not
        if row.get("sqnr_db") is None and fresh.get(row.get("module"), {}).get("sqnr_db") is not None:
            row["sqnr_db"] = fresh[row["module"]]["sqnr_db"]
    report["layers"] = rows
    return report


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


def describe_path(path: str, verify: bool = False) -> dict:
    """An artifact's manifest, footprint and report (every weight file's header checked; `verify`: every file's
    SHA-256 too), or a model's architecture, blocks and linears, as data (`inspect --json`)."""
    p = Path(path)
    if p.is_dir() and (p / MARKER_NAME).exists():
        verify_artifact(p)                # refuses it: an interrupted (or running) write
    if p.is_dir() and (p / CONFIG_NAME).exists() and "quantization_config" in read_config(p, require_dicompress=False):
        return _describe_artifact(p, verify)
    if verify:
        raise ArtifactError(f"{path} is not a dicompress artifact: nothing to verify",
                            hint="--verify checks an artifact's files against their recorded SHA-256")
    return _describe_model(path)


def format_description(d: dict) -> str:
    if d["kind"] == "model":
        return "\n".join([
            f"model: {d['name']} ({d['path']})", f"  class: {d['class']}  arch: {d['arch']}",
            f"  blocks: {', '.join(f'{v} {k}' for k, v in d['blocks'].items())}",
            f"  parameters: {d['parameters']:,}",
            f"  linears: {d['linears']}; quantized by default: {d['quantized_by_default']} "
            f"(include {d['include']}, keep {d['keep']})",
            f"  digits evaluation: {'yes (zoo model)' if d['digits_eval'] else 'no'}"])
    lines = [f"artifact: {d['path']}", f"  format version: {d['format_version']}",
             f"  source model:   {d['source_model']}"]
    lines += [f"  {k}: {v}" for k, v in d["verify"].items() if k not in ("path", "checksums")]
    if d.get("verified"):
        lines.append("  verified: " + verified_line(d["verify"]))
    lines.append("  manifest:")
    lines += [f"    {n:4d} x {op}" for op, n in d["manifest"].items()]
    if d.get("report"):
        lines += ["", format_summary(d["report"])]
    return "\n".join(lines)


def _describe_artifact(p: Path, verify: bool = False) -> dict:
    info = verify_artifact(p, checksums=verify)
    qcfg = read_config(p)["quantization_config"]
    ops = Counter(f"{e['op']} {e.get('codec', '')} w{e['bits']}" if "bits" in e else e["op"]
                  for e in qcfg.get("manifest", []))
    rep = p / REPORT_NAME
    return {"kind": "artifact", "path": str(p), "format_version": qcfg.get("format_version"),
            "source_model": (qcfg.get("source") or {}).get("model"), "verify": info, "verified": verify,
            "manifest": dict(ops.most_common()),
            "report": json.loads(rep.read_text()) if rep.exists() else None}


def _describe_model(path: str) -> dict:
    try:
        info = resolve_model(path)
    except ModelError as e:       # its hint names run's --model; inspect takes the path as its argument
        raise ModelError(str(e.args[0]), hint="give `dicompress inspect` a dicompress artifact, a local diffusers "
                                              "transformer or pipeline directory, or zoo:tiny-flux-digits") from None
    adapter = adapter_for_class(info.class_name)
    model = meta_model(info)          # built on the meta device: no weights are read
    d = adapter.describe(model)
    lin = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = [n for n in lin if matches(n, adapter.quant_include) and not matches(n, adapter.quant_keep)]
    return {"kind": "model", "name": info.name, "path": str(info.path), "class": info.class_name,
            "arch": d["arch"], "blocks": d["blocks"], "parameters": d["params"], "linears": len(lin),
            "quantized_by_default": len(chosen), "include": list(adapter.quant_include),
            "keep": list(adapter.quant_keep), "digits_eval": info.is_zoo}
