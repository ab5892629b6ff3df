"""Mixture of Blocks benchmark: the `dense2moe+mob` row of bench/moe.json on the embedded digits model.

    python tools/bench_mob.py --out bench/mob.json          # also writes bench/mob.md
    python tools/bench_mob.py --moe-artifact /tmp/moe_art   # reuse (or keep) the dense2moe model between runs

The teacher is zoo:tiny-flux-digits. dense2moe runs with the settings of bench_moe.py's `dense2moe` row (importance
partition, 7 routed experts top-2 + a 1/8 shared expert, 300 distillation steps, same calibration); the calibration
is then captured again on the MoE model (as a recipe does after a structural pass) and `mob` trains on it.
`mob_row` takes the converted model and returns the row: bench_moe's fields (method dense2moe+mob,
skipped_block_fraction on the calibration rows, class accuracy, Frechet and PSNR against the teacher's samples,
latency_ratio = MoB student / teacher CPU time per forward in this run, activated parameter fractions, seconds)
plus the dense2moe model's latency_ratio measured in the same run, the skipped fractions seen while sampling
the evaluation images and at the latency inputs (latency_ratio times one forward at t = 0.5, 16 samples), and
sampling_latency_ratio: the wall time of a whole 16-step sampling of 16 digits, every timestep of the schedule.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dicompress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_moe import CALIBRATION, moe_passes  # noqa: E402

# bench_moe.py's defaults for its dense2moe row (bench_moe.py's `dense2moe+mob` method runs mob_row on the very
# model of its dense2moe row)
MOE_ARGS = argparse.Namespace(experts=8, top_k=2, shared_fraction=0.125, balance_weight=0.01, distill_steps=200,
                              distill_lr=1e-4, batch_size=32, seed=0, e2e_steps=600, e2e_lr=2e-4, e2e_batch_size=16)


def _tracking(model, on: bool) -> None:
    from dicompress.moe.blocks import is_gated
    for m in model.modules():
        if is_gated(m):
            m.mob_track = on
            if on:
                m.mob_seen = m.mob_skipped = 0


def _skipped_fraction(model, fn) -> float:
    """Skipped share of all block executions (every block counts, gated or not) while `fn()` runs."""
    from dicompress.moe.mob_train import tracked_skips
    n_blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(
        (k["hidden_states"] if "hidden_states" in k else a[0]).shape[0]),
                                           with_kwargs=True)
    _tracking(model, True)
    try:
        fn()
    finally:
        _tracking(model, False)
        hook.remove()
    skipped, _ = tracked_skips(model)
    return skipped / (n_blocks * sum(calls))


def sampling_latency_ratios(models: dict, teacher, cond, rounds: int = 3, batch: int = 16) -> dict:
    """{name: median over rounds of the model's / the teacher's wall time for a whole 16-step sampling of `batch`
    digits (classes 0..9, 0..5): every timestep of the schedule, where latency_ratio times one (t = 0.5)."""
    from dicompress.zoo.sampler import sample
    classes, seeds = torch.arange(batch) % 10, list(range(batch))

    def secs(m):
        t = time.perf_counter()
        sample(m, cond, classes, seeds)
        return time.perf_counter() - t
    ratios = {k: [] for k in models}
    for _ in range(rounds):
        base = secs(teacher)
        for k, m in models.items():
            ratios[k].append(secs(m) / base)
    return {k: round(statistics.median(v), 4) for k, v in ratios.items()}


def mob_row(moe_model, teacher, store, zoo_dir, mob: dict, *, moe_report: dict, teacher_images, base: dict,
            samples_per_class: int) -> dict:
    """Train MoB on `moe_model` (converted by dense2moe; modified in place) with the calibration `store` captured
    on it; the bench_moe row of the result."""
    from dicompress.eval import evaluate_digits
    from dicompress.eval.latency import latency_ratio, latency_ms_per_step
    from dicompress.zoo import load_conditioning
    cond = load_conditioning(zoo_dir)
    dense2moe = copy.deepcopy(moe_model)
    t = time.perf_counter()
    state = dicompress.compress(moe_model, [{"mob": mob}], calibration=store, teacher=teacher, progress=False)
    secs = time.perf_counter() - t
    rep = state.report["passes"][-1]
    common = {"samples_per_class": samples_per_class, "progress": False}
    box = {}
    eval_skip = _skipped_fraction(moe_model, lambda: box.update(m=evaluate_digits(
        moe_model, teacher, zoo_dir, teacher_samples=teacher_images, **common)[0]))
    m = box["m"]
    lat_skip = _skipped_fraction(moe_model, lambda: latency_ms_per_step(moe_model, cond, warmup=0, repeats=1))
    lat, lat_moe = latency_ratio(moe_model, teacher, cond), latency_ratio(dense2moe, teacher, cond)
    samp = sampling_latency_ratios({"mob": moe_model, "dense2moe": dense2moe}, teacher, cond)
    return {"kind": "quality", "method": "dense2moe+mob",
            "activated_ffn_param_fraction": moe_report["activated_ffn_param_fraction"],
            "activated_ffn_param_fraction_model": moe_report["activated_ffn_param_fraction_model"],
            # per sample and step: dense2moe's activated parameters less those of the blocks MoB skips
            "activated_param_fraction": round(moe_report["activated_param_fraction"] * rep["activated_param_fraction"],
                                              4),
            "oracle_topk_coverage": moe_report["oracle_topk_coverage"],
            "router_topk_coverage": moe_report["router_topk_coverage"],
            "router_recall": moe_report["router_recall"], "load_max_over_mean": moe_report["load_max_over_mean"],
            "skipped_block_fraction": rep["skipped_block_fraction"],
            "skipped_block_fraction_eval": round(eval_skip, 4), "skipped_block_fraction_latency": round(lat_skip, 4),
            "class_acc": m["class_acc"], "class_acc_teacher": base["class_acc_teacher"],
            "frechet": round(m["frechet"], 4), "frechet_teacher": round(base["frechet_teacher"], 4),
            "psnr_db": round(m["psnr_db"], 3), "latency_ratio": round(lat, 4),
            "latency_ratio_dense2moe": round(lat_moe, 4), "sampling_latency_ratio": samp["mob"],
            "sampling_latency_ratio_dense2moe": samp["dense2moe"], "distill_seconds": round(secs, 1),
            "mob": {k: rep.get(k) for k in ("skip_target", "skippable", "groups", "threshold", "routers",
                                            "recovery")},
            "skip_rate": {r["module"]: r["skip_rate"] for r in state.report["layers"] if r.get("method") == "mob"}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/mob.json")
    ap.add_argument("--model", default="zoo:tiny-flux-digits")
    ap.add_argument("--calibration", default=str(CALIBRATION))
    ap.add_argument("--moe-artifact", default=None, help="load the dense2moe model from here if it exists, else "
                                                         "convert and save it there")
    ap.add_argument("--skip", type=float, default=0.25)
    ap.add_argument("--group-size", type=int, default=3)
    ap.add_argument("--router-steps", type=int, default=300)
    ap.add_argument("--router-lr", type=float, default=1e-2)
    ap.add_argument("--budget-weight", type=float, default=10.0)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--recovery-steps", type=int, default=200)
    ap.add_argument("--recovery-lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--samples-per-class", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import yaml
    from diffusers import FluxTransformer2DModel
    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.eval import evaluate_digits
    from dicompress.models import load_transformer, resolve_model
    from dicompress.recipe import CalibrationConfig

    t0, load_avg = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    info = resolve_model(args.model)
    teacher = load_transformer(info)
    base, images = evaluate_digits(teacher, teacher, info.path, samples_per_class=args.samples_per_class,
                                   progress=False)
    cfg = CalibrationConfig(**yaml.safe_load(Path(args.calibration).read_text()))
    root = Path(tempfile.mkdtemp(prefix="dicompress-bench-mob-"))
    meta = {"name": info.name, "path": info.path}
    art = Path(args.moe_artifact) if args.moe_artifact else None
    if art is not None and (art / "moe_report.json").exists():
        moe = FluxTransformer2DModel.from_pretrained(art).eval()
        moe_report = json.loads((art / "moe_report.json").read_text())
    else:
        store = capture(teacher, adapter_for(teacher), cfg, meta, root / "teacher", block_inputs=True, progress=False)
        moe = load_transformer(info)
        state = dicompress.compress(moe, moe_passes("dense2moe", MOE_ARGS), calibration=store, teacher=teacher,
                                    progress=False)
        moe_report = state.report["passes"][-1]
        if art is not None:
            dicompress.save(state, art, overwrite=True)
            (art / "moe_report.json").write_text(json.dumps(moe_report, indent=2))
    print(f"dense2moe ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    store_moe = capture(moe, adapter_for(moe), cfg, meta, root / "moe", block_inputs=True, progress=False)
    mob = {"skip": args.skip, "group_size": args.group_size,
           "distill": {"steps": args.router_steps, "lr": args.router_lr, "batch_size": args.batch_size,
                       "checkpoint_every": 0},
           "budget_weight": args.budget_weight, "temperature": args.temperature,
           "recovery": {"steps": args.recovery_steps, "lr": args.recovery_lr, "batch_size": args.batch_size,
                        "checkpoint_every": 0}}
    row = mob_row(moe, teacher, store_moe, info.path, mob, moe_report=moe_report, teacher_images=images["teacher"],
                  base=base, samples_per_class=args.samples_per_class)
    shutil.rmtree(root, ignore_errors=True)
    res = {"rows": [row], "settings": {"model": args.model, "calibration": str(Path(args.calibration)),
                                       "dense2moe": moe_passes("dense2moe", MOE_ARGS)[0]["dense2moe"], "mob": mob,
                                       "samples_per_class": args.samples_per_class},
           "command": "python " + " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_start": load_avg,
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "dicompress": dicompress.__version__}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    lines = ["| method | skipped block executions (calibration / eval sampling / latency inputs) | activated params | "
             "class acc (teacher) | Frechet (teacher) | PSNR dB | latency vs teacher (dense2moe, same run) | "
             "16-step sampling vs teacher (dense2moe) | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['skipped_block_fraction']:.3f} / {r['skipped_block_fraction_eval']:.3f} / "
                     f"{r['skipped_block_fraction_latency']:.3f} | {r['activated_param_fraction']:.3f} | "
                     f"{r['class_acc']:.3f} ({r['class_acc_teacher']:.3f}) | {r['frechet']:.2f} "
                     f"({r['frechet_teacher']:.2f}) | {r['psnr_db']:.2f} | {r['latency_ratio']:.3f}x "
                     f"({r['latency_ratio_dense2moe']:.3f}x) | {_x(r.get('sampling_latency_ratio'))} "
                     f"({_x(r.get('sampling_latency_ratio_dense2moe'))}) | {r['distill_seconds']:.0f} |")
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.3f}x"


if __name__ == "__main__":
    main()
