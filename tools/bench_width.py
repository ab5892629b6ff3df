"""Width-pruning benchmark on the embedded model: every method at the same parameter budgets, the same recovery
budget and the same evaluation samples, one run.

    python tools/bench_width.py --out bench/width.json      # also writes bench/width.md
    # or each budget in its own process, then joined (the README's numbers were made this way):
    python tools/bench_width.py --out bench/width_20.json --ratios 0.2 --distill-ratios --threads 1
    python tools/bench_width.py --out bench/width_40.json --ratios 0.4 --distill-ratios 0.4 --batch-size 16 \
        --memory-steps --threads 1
    python tools/bench_width.py --out bench/width.json --combine bench/width_20.json bench/width_40.json

Methods (rows), for each budget (fraction of the blocks' parameters removed, --ratios):
  tp_magnitude        width_prune, torch-pruning's group magnitude importance
  tp_taylor           width_prune, torch-pruning's group Taylor importance on calibration rows
  random              width_prune, random units
  mask_prune          EcoDiff: hard-concrete masks trained on the final latent of the whole sampling trajectory
  mask_prune_onestep  the same masks trained on single-step predictions (no trajectory loss)
  ppcl_width          PPCL width: FFNs replaced by residual linear projectors (least squares, then its own
                      per-block distillation, part of the method); it removes whole FFNs, so its budgets are
                      the double blocks' FFNs (21% of the embedded model's block parameters) below 0.3, else
                      every FFN (39%)
Each row is evaluated as pruned (`distilled: false`) and, for the budgets in --distill-ratios, again after the
same end-to-end distillation against the teacher (`distilled: true`, same steps, lr and rows for every method).
Columns: param_fraction and block_param_fraction (student / teacher parameters), class accuracy and Frechet
distance of classifier features (student and teacher, same samples), PSNR vs the teacher's samples,
latency_ratio (student / teacher CPU time per sampling step, timed back to back in this run), seconds (pruning,
plus distillation for distilled rows). `peak_memory_by_steps`: activation memory of mask_prune's backward at
T sampling steps, time-step checkpointed vs plain backpropagation.
"""
from __future__ import annotations

import argparse
import atexit
import copy
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
from dicompress.passes import PASSES
from dicompress.recipe import CalibrationConfig
from dicompress.zoo import load_conditioning

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "calibration/digits_10x2.yaml"
WIDTH_IMPORTANCE = {"tp_magnitude": "magnitude", "tp_taylor": "taylor", "random": "random"}
MASK_LOSS = {"mask_prune": "trajectory", "mask_prune_onestep": "onestep"}
METHODS = ("mask_prune", "mask_prune_onestep", "ppcl_width", "tp_magnitude", "tp_taylor", "random")


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_params(model) -> int:
    return sum(n_params(getattr(model, attr)) for attr, _ in adapter_for(model).block_lists)


def prune_passes(method: str, ratio: float, args) -> list[dict]:
    """The recipe passes of one method at one budget; every width method prunes the same units (--heads)."""
    units = {"ratio": ratio, "heads": args.heads, "allocation": args.allocation}
    if method in WIDTH_IMPORTANCE:
        return [{"width_prune": {**units, "importance": WIDTH_IMPORTANCE[method], "seed": args.seed}}]
    if method in MASK_LOSS:
        return [{"mask_prune": {**units, "loss": MASK_LOSS[method], "seed": args.seed, **json.loads(args.mask)}}]
    if method == "ppcl_width":
        # ppcl_width has no ratio: it replaces whole FFNs. The double blocks' FFNs are 21% of the embedded
        # model's block parameters, every FFN 39%; the budget picks the set nearest it.
        include = ["transformer_blocks.*"] if ratio < 0.3 else None
        return [{"ppcl_width": {"include": include, **json.loads(args.ppcl)}}]
    raise ValueError(f"unknown method {method}")


def run(args) -> dict:
    torch.manual_seed(0)
    missing = sorted({"mask_prune" if m in MASK_LOSS else m for m in args.methods
                      if m not in WIDTH_IMPORTANCE} - set(PASSES))
    if missing:
        sys.exit(f"bench_width: this dicompress has no pass {missing}; drop those methods with --methods")
    info = resolve_model(args.model)
    teacher = load_transformer(info)
    cond = load_conditioning(info.path)
    common = {"samples_per_class": args.samples_per_class, "progress": False}
    t0 = time.perf_counter()
    base, images = evaluate_digits(teacher, teacher, info.path, **common)
    calibration = Path(args.calibration).resolve()
    shown = str(calibration.relative_to(ROOT)) if calibration.is_relative_to(ROOT) else str(calibration)
    cfg = CalibrationConfig(**yaml.safe_load(calibration.read_text()))
    root = Path(tempfile.mkdtemp(prefix="dicompress-bench-width-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)      # the store is read until the bench ends
    store = capture(teacher, adapter_for(teacher), cfg, {"name": info.name, "path": info.path}, root,
                    block_inputs=True, progress=False)
    distill = {"steps": args.distill_steps, "lr": args.distill_lr, "batch_size": args.batch_size,
               "checkpoint_every": 0}
    rows = []

    def compress(student, passes):
        return dicompress.compress(student, passes, calibration=store, teacher=lambda: load_transformer(info),
                                   progress=False)

    def add(method, ratio, student, distilled, secs, report):
        m, _ = evaluate_digits(student, teacher, info.path, teacher_samples=images["teacher"], **common)
        row = {"method": method, "distilled": distilled, "ratio": ratio,
               "param_fraction": round(n_params(student) / n_params(teacher), 4),
               "block_param_fraction": round(block_params(student) / block_params(teacher), 4),
               "class_acc": m["class_acc"], "class_acc_teacher": base["class_acc_teacher"],
               "frechet": round(m["frechet"], 4), "frechet_teacher": round(base["frechet_teacher"], 4),
               "psnr_db": round(m["psnr_db"], 3), "latency_ratio": round(latency_ratio(student, teacher, cond), 4),
               "seconds": round(secs, 1), "pass_report": report}
        rows.append(row)
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
        print(f"{method:19s} {ratio:.2f} {'distilled' if distilled else 'pruned   '} blocks "
              f"{row['block_param_fraction']:.3f}  acc {row['class_acc']:.3f} ({row['class_acc_teacher']:.3f})  "
              f"frechet {row['frechet']:.2f} ({row['frechet_teacher']:.2f})  psnr {row['psnr_db']:.2f}  "
              f"latency {row['latency_ratio']:.3f}x  {secs:.0f} s", flush=True)

    for ratio in args.ratios:
        for method in args.methods:
            student = load_transformer(info)
            t = time.perf_counter()
            state = compress(student, prune_passes(method, ratio, args))
            secs = time.perf_counter() - t
            report = {k: v for k, v in state.report["passes"][-1].items() if not isinstance(v, (list, dict))
                      or len(json.dumps(v)) < 400}
            add(method, ratio, student, False, secs, report)
            if ratio in args.distill_ratios and args.distill_steps:
                t = time.perf_counter()
                state = compress(student, [{"distill": copy.deepcopy(distill)}])
                dsecs = time.perf_counter() - t
                rep = state.report["passes"][-1]
                add(method, ratio, student, True, secs + dsecs,
                    {"distill_seconds": round(dsecs, 1), "loss_first": rep.get("loss_first"),
                     "loss_last": rep.get("loss_last")})
    memory = peak_memory(args, teacher, store) if "mask_prune" in args.methods and args.memory_steps else None
    return {"rows": rows, "peak_memory_by_steps": memory,
            "teacher": {k: base[k] for k in ("class_acc_teacher", "frechet_teacher")},
            "settings": {"model": args.model, "calibration": shown, "ratios": args.ratios, "heads": args.heads,
                         "allocation": args.allocation, "mask": json.loads(args.mask), "ppcl": json.loads(args.ppcl),
                         "calibration_rows": int(store.model_inputs()["hidden_states"].shape[0]),
                         "samples_per_class": args.samples_per_class, "distill": distill,
                         "distill_ratios": args.distill_ratios},
            "command": "python " + " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1),
            "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "dicompress": dicompress.__version__}}


def peak_memory(args, teacher, store) -> dict:
    """mask_prune's activation memory at T steps, checkpointed vs plain backpropagation (prune/trajectory.py)."""
    from dicompress.prune.trajectory import peak_memory_by_steps
    return peak_memory_by_steps(teacher, adapter_for(teacher), store.model_inputs(), args.memory_steps,
                                samples=args.memory_samples)


def markdown(res: dict) -> str:
    lines = ["| method | removed | distilled | block params kept | class acc (teacher) | Frechet (teacher) | "
             "PSNR dB | latency vs teacher | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | {'yes' if r['distilled'] else 'no'} | "
                     f"{r['block_param_fraction']:.3f} | {r['class_acc']:.3f} ({r['class_acc_teacher']:.3f}) | "
                     f"{r['frechet']:.2f} ({r['frechet_teacher']:.2f}) | {r['psnr_db']:.2f} | "
                     f"{r['latency_ratio']:.3f}x | {r['seconds']:.0f} |")
    mem = res.get("peak_memory_by_steps")      # {"checkpointed": {T: bytes}, "plain": {T: bytes}}
    if mem:
        steps = list(mem["checkpointed"])
        lines += ["", "| activation memory of the mask gradient, MiB, at T sampling steps | "
                  + " | ".join(f"T = {t}" for t in steps) + " |", "|---|" + "---|" * len(steps)]
        for way in ("checkpointed", "plain"):
            lines.append(f"| {way} backward | " + " | ".join(f"{mem[way][t] / 2**20:.2f}" for t in steps) + " |")
    return "\n".join(lines) + "\n"


def combine(paths: list[str]) -> dict:
    """Several runs' results as one (e.g. the budgets run as concurrent processes): rows in the given order, each
    marked with its run's command; the runs must share the model, calibration, samples and teacher numbers."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    for r in runs[1:]:
        for k in ("model", "calibration", "samples_per_class", "heads", "allocation"):
            if r["settings"][k] != first["settings"][k]:
                sys.exit(f"bench_width --combine: the runs differ in {k}: {first['settings'][k]} vs {r['settings'][k]}")
        if r["teacher"] != first["teacher"]:
            sys.exit("bench_width --combine: the runs' teacher numbers differ (not the same evaluation samples)")
    rows = [{**row, "run": i} for i, r in enumerate(runs) for row in r["rows"]]
    memory = next((r["peak_memory_by_steps"] for r in runs if r.get("peak_memory_by_steps")), None)
    return {"rows": rows, "peak_memory_by_steps": memory, "teacher": first["teacher"],
            "runs": [{"command": r["command"], "settings": r["settings"], "seconds": r["seconds"],
                      "machine": r["machine"]} for r in runs]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/width.json")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="write --out from these runs' JSON files instead "
                                                                 "of running (rows keep their run's index)")
    ap.add_argument("--model", default="zoo:tiny-flux-digits")
    ap.add_argument("--calibration", default=str(CALIBRATION), help="calibration set file (default: digits_10x2)")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                    help="comma-separated, of " + ",".join(METHODS))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4],
                    help="fractions of the blocks' parameters removed")
    ap.add_argument("--distill-ratios", type=float, nargs="*", default=[0.4],
                    help="budgets whose rows are also distilled (same budget for every method)")
    ap.add_argument("--heads", action="store_true", help="prune attention heads too (default: FFN neurons only)")
    ap.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    ap.add_argument("--mask", default="{}", help="extra mask_prune keys, JSON (e.g. '{\"steps\": 100}')")
    ap.add_argument("--ppcl", default="{}", help="extra ppcl_width keys, JSON")
    ap.add_argument("--distill-steps", type=int, default=600, help="end-to-end distillation steps (0 = none)")
    ap.add_argument("--distill-lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--samples-per-class", type=int, default=20)
    ap.add_argument("--memory-steps", type=int, nargs="*", default=[4, 8, 16, 32],
                    help="sampling steps T at which mask_prune's backward memory is measured (none: skip)")
    ap.add_argument("--memory-samples", type=int, default=4, help="trajectories in the memory measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.combine:
        res = combine(args.combine)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown(res))
        print(markdown(res))
        return
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {','.join(METHODS)}")
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
