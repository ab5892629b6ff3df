"""CLEAR benchmark: quality of the `clear` pass on the embedded model, and the attention scaling rows.

    python tools/bench_clear.py --out bench/clear.json            # quality rows (+ scaling, see below); bench/clear.md
    python tools/bench_clear.py --out bench/clear.json --scaling-json bench/clear_scaling.json

`quality` rows on zoo:tiny-flux-digits (8x8 image token grid, 4 text tokens, 4 double + 8 single blocks, every
block's attention CLEAR): radius 2, 3, 4 and 3 with 2x2 pooled keys, each distilled (--distill-steps on the
teacher's trajectories of --calibration), plus radius 3 not distilled. Columns: radius, pooled (pooling factor or
null), distilled, image keys per image query (mean inside the circle, the grid's borders cut it), class accuracy and
Frechet distance of classifier features (student and teacher on the same noise and classes), PSNR of the student's
samples vs the teacher's, distill_seconds (the pass: installing the processors and training).

`scaling` rows (attention time and FLOPs by token grid, dense SDPA vs CLEAR): from tools/bench_clear_scaling.py's
`scaling_rows()` when that module exists (--skip-scaling leaves them out), or merged from a saved
--scaling-json (its "rows" of kind "scaling").
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import dicompress

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "calibration/digits_10x8.yaml"
# (radius, pooling factor, distilled)
CONFIGS = ((2, None, True), (3, None, True), (4, None, True), (3, 2, True), (3, None, False))


def quality_rows(args) -> tuple[list[dict], dict]:
    import yaml
    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.eval import evaluate_digits
    from dicompress.models import load_transformer, resolve_model
    from dicompress.recipe import CalibrationConfig

    info = resolve_model(args.model)
    teacher = load_transformer(info)
    common = {"samples_per_class": args.samples_per_class, "progress": False}
    cache = Path(args.teacher_cache) if args.teacher_cache else None
    if cache is not None and cache.exists():       # the teacher's samples and scores of an earlier run (same plan)
        base, images = torch.load(cache)
    else:
        base, images = evaluate_digits(teacher, teacher, info.path, **common)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((base, {"teacher": images["teacher"]}), cache)
    cfg = CalibrationConfig(**yaml.safe_load(Path(args.calibration).read_text()))
    root = Path(tempfile.mkdtemp(prefix="dicompress-bench-clear-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    store = capture(teacher, adapter_for(teacher), cfg, {"name": info.name, "path": info.path}, root,
                    block_inputs=False, model_inputs=True, progress=False)
    rows = []
    for radius, pooling, distilled in args.configs:
        student = load_transformer(info)
        distill = {"steps": args.distill_steps if distilled else 0, "lr": args.distill_lr,
                   "batch_size": args.batch_size, "checkpoint_every": 0,
                   "warmup_steps": min(args.warmup_steps, args.distill_steps if distilled else 0)}
        t = time.perf_counter()
        state = dicompress.compress(student, [{"clear": {"radius": radius, "pooling": pooling, "distill": distill,
                                                         "flow_weight": args.flow_weight}}],
                                    calibration=store, teacher=teacher, progress=False)
        secs = time.perf_counter() - t
        rep = state.report["passes"][-1]
        m, _ = evaluate_digits(student, teacher, info.path, teacher_samples=images["teacher"], **common)
        row = {"kind": "quality", "radius": radius, "pooled": pooling, "distilled": distilled,
               "flow_weight": args.flow_weight if distilled else None,
               "image_keys_per_query": rep["image_keys_per_query"], "grid": rep["grid"],
               "class_acc": m["class_acc"], "class_acc_teacher": base["class_acc_teacher"],
               "frechet": round(m["frechet"], 4), "frechet_teacher": round(base["frechet_teacher"], 4),
               "psnr_db": round(m["psnr_db"], 3), "distill_seconds": round(secs, 1),
               "steps": rep.get("steps", 0), "loss_first": rep.get("loss_first"), "loss_last": rep.get("loss_last"),
               "params_trained": rep["params_trained"]}
        rows.append(row)
        print(f"r={radius} pool={pooling} distilled={distilled}: keys/query {row['image_keys_per_query']}  acc "
              f"{row['class_acc']:.3f} ({row['class_acc_teacher']:.3f})  frechet {row['frechet']:.2f} "
              f"({row['frechet_teacher']:.2f})  psnr {row['psnr_db']:.2f}  {secs:.0f} s", flush=True)
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    settings = {"model": args.model, "calibration": _rel(args.calibration),
                "calibration_rows": int(store.model_inputs()["hidden_states"].shape[0]),
                "distill_steps": args.distill_steps, "distill_lr": args.distill_lr, "batch_size": args.batch_size,
                "warmup_steps": args.warmup_steps, "samples_per_class": args.samples_per_class,
                "loss": "flow_weight x flow matching + 0.5 teacher prediction + 0.5 attention outputs"}
    return rows, settings


def scaling(args) -> list[dict]:
    """The scaling rows: a saved JSON's, else tools/bench_clear_scaling.py's scaling_rows() (defaults)."""
    if args.scaling_json:
        rows = json.loads(Path(args.scaling_json).read_text())["rows"]
    else:
        path = ROOT / "tools/bench_clear_scaling.py"
        if args.skip_scaling or not path.exists():
            return []
        spec = importlib.util.spec_from_file_location("bench_clear_scaling", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        rows = mod.scaling_rows()
    # that script's kinds (attention: the attention op alone; block: one double + one single FLUX-width block)
    # become `scope`, so every row here is `kind: scaling`
    return [{**r, "kind": "scaling", "scope": r.get("scope", r.get("kind", "attention"))} for r in rows
            if r.get("kind") != "quality"]


def _rel(p: str) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def markdown(res: dict) -> str:
    lines = []
    qual = [r for r in res["rows"] if r["kind"] == "quality"]
    if qual:
        s = res.get("quality_settings", {})
        lines += [f"Quality on {s.get('model')} (8x8 token grid), every block's attention CLEAR; distilled: "
                  f"{s.get('distill_steps')} steps, batch {s.get('batch_size')}, lr {s.get('distill_lr')} on "
                  f"{s.get('calibration_rows')} calibration rows; {s.get('samples_per_class')} samples per class.", "",
                  "| radius | pooled | distilled (flow_weight) | image keys / query (of 64) | class acc (teacher) | "
                  "Frechet (teacher) | PSNR dB | seconds |", "|---|---|---|---|---|---|---|---|"]
        for r in qual:
            pooled = f"{r['pooled']}x{r['pooled']}" if r["pooled"] else "no"
            lines.append(f"| {r['radius']} | {pooled} | "
                         f"{'yes (%g)' % r.get('flow_weight', 0) if r['distilled'] else 'no'} | {r['image_keys_per_query']:.1f} | "
                         f"{r['class_acc']:.3f} ({r['class_acc_teacher']:.3f}) | {r['frechet']:.2f} "
                         f"({r['frechet_teacher']:.2f}) | {r['psnr_db']:.2f} | {r['distill_seconds']:.0f} |")
    sc = [r for r in res["rows"] if r["kind"] == "scaling"]
    if sc:
        keys = [k for k in ("scope", "grid", "tokens", "method", "radius", "ms", "attn_flops", "speedup_vs_dense") if
                any(k in r for r in sc)]
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in sc:
            lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def combine(paths: list[str], out: Path) -> None:
    """One JSON / table from runs of config subsets; they must share settings (model, calibration, steps, samples)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    settings = [p.get("quality_settings") for p in parts if p.get("quality_settings")]
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"the runs differ in settings: {settings}")
    teacher = {(r["class_acc_teacher"], r["frechet_teacher"]) for p in parts for r in p["rows"] if r["kind"] == "quality"}
    if len(teacher) > 1:
        raise SystemExit(f"the runs' teacher numbers differ (other samples?): {teacher}")
    res = {"command": "; ".join(p["command"] for p in parts) + f"; python tools/bench_clear.py --out {out} "
                      f"--combine {' '.join(paths)}", "machine": parts[0]["machine"], "rows": [],
           "quality_settings": settings[0] if settings else None}
    for p in parts:
        res["rows"] += [r for r in p["rows"] if r["kind"] == "quality"]
    order = {c: i for i, c in enumerate(CONFIGS)}
    res["rows"].sort(key=lambda r: (bool(r.get("flow_weight")),
                                    order.get((r["radius"], r["pooled"], r["distilled"]), len(order))))
    res["rows"] += next(([r for r in p["rows"] if r["kind"] == "scaling"] for p in parts
                         if any(r["kind"] == "scaling" for r in p["rows"])), [])
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/clear.json")
    ap.add_argument("--model", default="zoo:tiny-flux-digits")
    ap.add_argument("--calibration", default=str(CALIBRATION))
    ap.add_argument("--configs", type=lambda s: [(int(a), int(b) if b != "-" else None, c == "d") for a, b, c in
                                                 (x.split(":") for x in s.split(","))],
                    default=list(CONFIGS), help="radius:pooling|-:d|u (distilled or not), comma separated")
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--flow-weight", type=float, default=0.0, help="the pass's flow_weight (1 = the paper's loss; "
                    "0 measured better here: README)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--samples-per-class", type=int, default=20)
    ap.add_argument("--teacher-cache", default=None, help="file keeping the teacher's samples and scores between "
                    "runs of config subsets (same --samples-per-class)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--scaling-json", default=None, help="merge the scaling rows saved by tools/bench_clear_scaling.py")
    ap.add_argument("--merge", action="store_true", help="keep --out's rows of the kind skipped this time")
    ap.add_argument("--combine", nargs="+", default=None, help="join the quality rows of runs made as separate "
                    "processes (--configs subsets with the same settings) into --out; nothing is run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.combine:
        return combine(args.combine, out)
    res = {"command": "python " + " ".join(["tools/bench_clear.py",
                                            *sys.argv[1:]]),
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__}, "rows": []}
    old = json.loads(out.read_text()) if args.merge and out.exists() else {"rows": []}
    if old.get("command"):
        res["command"] = f"{old['command']}; {res['command']}"
    if not args.skip_quality:
        rows, settings = quality_rows(args)
        res["rows"] += rows
        res["quality_settings"] = settings
    else:
        res["rows"] += [r for r in old["rows"] if r["kind"] == "quality"]
        if "quality_settings" in old:
            res["quality_settings"] = old["quality_settings"]
    sc = scaling(args)
    res["rows"] += sc or [r for r in old["rows"] if r["kind"] == "scaling"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(markdown(res))


if __name__ == "__main__":
    main()
