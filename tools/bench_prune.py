"""Depth-pruning benchmark on the embedded model: every method, same calibration, distillation budget and
evaluation plan, one run.

    python tools/bench_prune.py --out bench/prune.json      # also writes bench/prune.md

Methods (rows), for each number of removed blocks:
  ppcl           intervals from the depth analysis, each replaced by one block distilled layer-wise,
                 then end-to-end distillation
  amber          least-important blocks removed, kept neighbours weight-averaged, layer-wise then end-to-end
  naive          ppcl's intervals replaced by their middle teacher block, no distillation at all
  random         random intervals removing as many blocks, with ppcl's distillation budget
  hybrid_stream  (once per --convert) the deepest double blocks converted to single-stream, same budget
Columns: removed_block_fraction, param_fraction (student/teacher parameters), class accuracy and Frechet
distance of classifier features (student and teacher, same samples), latency_ratio (student/teacher CPU
time per sampling step, alternated in this run), distill_seconds.
"""
from __future__ import annotations

import argparse
import atexit
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.eval import evaluate_digits
from dicompress.eval.latency import latency_ratio
from dicompress.models import load_transformer, resolve_model
from dicompress.prune import random_intervals
from dicompress.recipe import CalibrationConfig
from dicompress.zoo import load_conditioning

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "calibration/digits_10x32.yaml"


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args) -> dict:
    torch.manual_seed(0)
    info = resolve_model(args.model)
    teacher = load_transformer(info)
    cond = load_conditioning(info.path)
    common = {"samples_per_class": args.samples_per_class, "progress": False}
    t0 = time.perf_counter()
    base, images = evaluate_digits(teacher, teacher, info.path, **common)
    calibration = Path(args.calibration).resolve()
    shown = str(calibration.relative_to(ROOT)) if calibration.is_relative_to(ROOT) else str(calibration)
    cfg = CalibrationConfig(**yaml.safe_load(calibration.read_text()))
    root = Path(tempfile.mkdtemp(prefix="dicompress-bench-prune-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)      # the store is read until the bench ends
    store = capture(teacher, adapter_for(teacher), cfg, {"name": info.name, "path": info.path}, root,
                    block_inputs=True, progress=False)
    refs = adapter_for(teacher).blocks(teacher)
    layer = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "checkpoint_every": 0}
    e2e = {"steps": args.e2e_steps, "lr": args.e2e_lr, "batch_size": args.batch_size, "checkpoint_every": 0,
           "student_trajectories": args.student_trajectories} if args.e2e_steps else None
    budget = {"distill": layer, "end_to_end": e2e}
    rows = []

    def add(method, removed, passes, **extra):
        student = load_transformer(info)
        t = time.perf_counter()
        state = dicompress.compress(student, passes, calibration=store, teacher=lambda: load_transformer(info),
                                    progress=False)
        secs = time.perf_counter() - t
        m, _ = evaluate_digits(student, teacher, info.path, teacher_samples=images["teacher"], **common)
        rep = state.report["passes"][-1]
        row = {"method": method, "removed_blocks": removed, "removed_block_fraction": round(removed / len(refs), 4),
               "param_fraction": round(n_params(student) / n_params(teacher), 4),
               "class_acc": m["class_acc"], "class_acc_teacher": base["class_acc_teacher"],
               "frechet": round(m["frechet"], 4), "frechet_teacher": round(base["frechet_teacher"], 4),
               "psnr_db": round(m["psnr_db"], 3), "latency_ratio": round(latency_ratio(student, teacher, cond), 4),
               "distill_seconds": round(secs, 1), **extra,
               **{k: rep[k] for k in ("intervals", "removed", "converted", "end_to_end") if k in rep},
               "layerwise_loss": [[r["loss_first"], r["loss_last"]] for r in state.report["layers"]
                                  if "loss_first" in r]}
        rows.append(row)
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(f"{method:13s} -{removed:<2d} params {row['param_fraction']:.3f}  acc {row['class_acc']:.3f} "
              f"(teacher {row['class_acc_teacher']:.3f})  frechet {row['frechet']:.2f} ({row['frechet_teacher']:.2f})"
              f"  latency {row['latency_ratio']:.3f}x  {secs:.0f} s", flush=True)
        return rep

    methods = args.methods.split(",")
    for k in args.removals:
        rep = None
        if "ppcl" in methods or "naive" in methods:
            ppcl = {"remove_blocks": k, "selection": args.ppcl_selection, **budget}
            rep = add("ppcl", k, [{"ppcl_depth": ppcl}], selection=args.ppcl_selection) if "ppcl" in methods else None
        if "naive" in methods:
            intervals = rep["intervals"] if rep else None
            passes = [{"ppcl_depth": {"intervals": intervals, "distill": {"steps": 0}}}] if intervals else \
                [{"ppcl_depth": {"remove_blocks": k, "distill": {"steps": 0}}}]
            add("naive", k, passes)
        if "random" in methods:
            intervals = random_intervals(refs, k, max_len=4, seed=args.seed)
            add("random", k, [{"ppcl_depth": {"intervals": [list(iv) for iv in intervals], **budget}}])
        if "amber" in methods:
            add("amber", k, [{"amber_depth": {"remove_blocks": k, **budget}}])
    if "hybrid_stream" in methods:
        for c in args.convert:
            add("hybrid_stream", 0, [{"hybrid_stream": {"convert": c, **budget}}])
    return {"rows": rows, "teacher": {k: base[k] for k in ("class_acc_teacher", "frechet_teacher")},
            "settings": {"model": args.model, "calibration": shown,
                         "calibration_rows": int(store.model_inputs()["hidden_states"].shape[0]),
                         "samples_per_class": args.samples_per_class, "layerwise": layer, "end_to_end": e2e},
            "command": "python " + " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1),
            "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "dicompress": dicompress.__version__}}


def markdown(res: dict) -> str:
    lines = ["| method | removed blocks | params vs teacher | class acc (teacher) | Frechet (teacher) | PSNR (dB) "
             "| latency vs teacher | distill s |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        what = r.get("converted") and f"{len(r['converted'])} converted" or f"{r['removed_blocks']}/12"
        lines.append(f"| {r['method']} | {what} | {r['param_fraction']:.3f} | {r['class_acc']:.3f} "
                     f"({r['class_acc_teacher']:.3f}) | {r['frechet']:.2f} ({r['frechet_teacher']:.2f}) | "
                     f"{r['psnr_db']:.2f} | {r['latency_ratio']:.3f}x | {r['distill_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/prune.json")
    ap.add_argument("--model", default="zoo:tiny-flux-digits")
    ap.add_argument("--calibration", default=str(CALIBRATION), help="calibration set file (default: digits_10x32)")
    ap.add_argument("--methods", default="ppcl,naive,random,amber,hybrid_stream")
    ap.add_argument("--removals", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--convert", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=300, help="layer-wise steps per rebuilt block")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--e2e-steps", type=int, default=1500, help="end-to-end steps (0 = none)")
    ap.add_argument("--e2e-lr", type=float, default=2e-4)
    ap.add_argument("--student-trajectories", type=int, default=0,
                    help="end-to-end rounds of the student's own sampling trajectories (DAgger); 0 = none")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--samples-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random intervals")
    ap.add_argument("--ppcl-selection", default="greedy", choices=["greedy", "min_total"],
                    help="ppcl_depth.selection: how the analysis' intervals are chosen")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    res = run(args)
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(markdown(res))


if __name__ == "__main__":
    main()
