"""Dense2MoE benchmark: the MoE FFN's CPU time against the dense FFN's at FLUX width, and the pass's quality on the
embedded model against its baselines.

    python tools/bench_moe.py --out bench/moe.json                 # both; also writes bench/moe.md
    python tools/bench_moe.py --out bench/moe.json --skip-quality  # kernel rows only

`ffn_kernel` rows: a diffusers FeedForward 3072 -> 12288 -> 3072 (GELU tanh, fp32) against the MoEFFN of the same
neurons split into 8 equal slices of 1536: the shared expert (1 slice) + 7 routed experts, top-2, so every token
runs 3 of 8 slices (0.375 of the FFN's parameters, plus a 7 x 3072 router). Batch 1 at --tokens tokens; the router
has random weights (near-uniform load, reported). dense_ms / moe_ms: medians of --repeats forwards, the two timed
back to back in each round; speedup = dense_ms / moe_ms (the issue's target: moe <= 0.5x dense, speedup >= 2).

Quality rows on zoo:tiny-flux-digits (every FFN: the 4 double blocks' ff and ff_context and the 8 single blocks'
MLPs, 128 -> 512; default split: shared 64 + 8 routed experts of 56, top-2, so a token runs 176 of 512 neurons,
0.344 of the FFN parameters, 0.35 with the router), every method with the same split shape (--experts, --top-k,
--shared-fraction):
  dense2moe          importance partition, router fit, per-block distillation with the balance loss, then
                     end-to-end distillation against the teacher's predictions (--e2e-steps)
  dense2moe_cluster  co-activation clustering partition, same distillation
  naive_split        the same experts and router as dense2moe, no distillation
  random_partition   a random neuron partition (shared included), same router fit and distillation
Columns: activated FFN parameter fraction (converted FFNs, and all of the model's FFNs), activated parameter
fraction, class accuracy and Frechet distance of classifier features (student and teacher, same samples), PSNR
vs the teacher's samples, latency_ratio (student / teacher CPU time per sampling step, this run), distill_seconds.
Per-sample data (classifier features, MSE against the teacher) go to <out>.samples.npz (tools/bench_moe_samples.py),
and `comparisons` rows give dense2moe minus each peer, Frechet and PSNR on the same samples, with 95% bootstrap
intervals (dicompress/eval/paired.py); --merge keeps the merged rows' per-sample data, and a row merged from a run
that kept none gets its comparison marked unavailable.
"""
from __future__ import annotations

import argparse
import atexit
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
from dicompress.moe import moe_from_dense

sys.path.insert(0, str(Path(__file__).resolve().parent))     # bench_moe_samples, bench_mob: tools/ modules
from bench_moe_samples import (REFERENCE, SampleScorer, comparisons, comparisons_markdown, locked,  # noqa: E402
                               read_samples, real_features, sidecar_path, write_samples)

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "calibration/digits_10x8.yaml"
METHODS = ("dense2moe", "dense2moe+mob", "naive_split", "random_partition", "dense2moe_cluster")


def _ms(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t) * 1e3


@torch.no_grad()
def kernel_rows(tokens: list[int], repeats: int, dim: int = 3072, hidden: int = 12288, slices: int = 8,
                top_k: int = 2) -> list[dict]:
    from diffusers.models.attention import FeedForward
    torch.manual_seed(0)
    dense = FeedForward(dim, dim_out=dim, inner_dim=hidden, activation_fn="gelu-approximate").eval()
    width = hidden // slices
    g = torch.Generator().manual_seed(0)
    router = (torch.randn(slices - 1, dim, generator=g) / dim ** 0.5, torch.zeros(slices - 1))
    moe = moe_from_dense(dense, torch.arange(width), [torch.arange(width * (i + 1), width * (i + 2))
                                                      for i in range(slices - 1)], top_k, router=router).eval()
    rows = []
    for n in tokens:
        x = torch.randn(1, n, dim, generator=g)
        for _ in range(2):                                   # warm-up (allocator, GEMM dispatch)
            dense(x), moe(x)
        d, m = [], []
        for _ in range(repeats):                             # back to back: a slow spell hits both sides
            d.append(_ms(dense, x))
            m.append(_ms(moe, x))
        moe.load.zero_()
        moe.track_load = True
        moe(x)
        moe.track_load = False
        load = (moe.load.double() / moe.load.sum()).tolist()
        rows.append({"kind": "ffn_kernel", "dim": dim, "hidden": hidden, "shared": width,
                     "experts": f"{slices - 1}x{width}", "top_k": top_k, "tokens": n, "batch": 1,
                     "activated_ffn_param_fraction": round(moe.activated_params() /
                                                           sum(p.numel() for p in dense.parameters()), 4),
                     "dense_ms": round(statistics.median(d), 1), "moe_ms": round(statistics.median(m), 1),
                     "speedup": round(statistics.median(d) / statistics.median(m), 3),
                     "moe_over_dense": round(statistics.median(m) / statistics.median(d), 3),
                     "load": [round(v, 3) for v in load]})
        print(f"ffn_kernel {n} tokens: dense {rows[-1]['dense_ms']} ms, moe {rows[-1]['moe_ms']} ms, "
              f"speedup {rows[-1]['speedup']}x", flush=True)
    return rows


def moe_passes(method: str, args) -> list[dict]:
    shape = {"experts": args.experts, "top_k": args.top_k, "shared_fraction": args.shared_fraction,
             "seed": args.seed, "balance_weight": args.balance_weight}
    distill = {"steps": args.distill_steps, "lr": args.distill_lr, "batch_size": args.batch_size,
               "checkpoint_every": 0}
    part = {"dense2moe": "importance", "dense2moe_cluster": "cluster", "naive_split": "importance",
            "random_partition": "random"}[method]
    e2e = {"steps": args.e2e_steps, "lr": args.e2e_lr, "batch_size": args.e2e_batch_size, "checkpoint_every": 0}
    if method == "naive_split":
        distill, e2e = {"steps": 0}, None
    return [{"dense2moe": {**shape, "partition": part, "distill": distill,
                           "end_to_end": e2e if args.e2e_steps else None}}]


def quality_rows(args) -> tuple[list[dict], dict]:
    import yaml
    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.eval import evaluate_digits
    from dicompress.eval.latency import latency_ratio
    from dicompress.models import load_transformer, resolve_model
    from dicompress.recipe import CalibrationConfig
    from dicompress.zoo import load_conditioning

    info = resolve_model(args.model)
    teacher = load_transformer(info)
    cond = load_conditioning(info.path)
    common = {"samples_per_class": args.samples_per_class, "progress": False}
    base, images = evaluate_digits(teacher, teacher, info.path, **common)
    cfg = CalibrationConfig(**yaml.safe_load(Path(args.calibration).read_text()))
    root = Path(tempfile.mkdtemp(prefix="dicompress-bench-moe-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    store = capture(teacher, adapter_for(teacher), cfg, {"name": info.name, "path": info.path}, root,
                    block_inputs=True, progress=False)
    rows, kept, samples = [], {}, {}
    scorer = SampleScorer(info.path, images["teacher"], args.samples_per_class)
    for method in args.methods:
        if method == "dense2moe+mob":
            rows.append(_mob_row(args, info, teacher, store, cfg, root, kept, base, images))
            print(f"{method:18s} skipped {rows[-1]['skipped_block_fraction']:.3f}  acc {rows[-1]['class_acc']:.3f}  "
                  f"frechet {rows[-1]['frechet']:.2f}  psnr {rows[-1]['psnr_db']:.2f}  latency "
                  f"{rows[-1]['latency_ratio']:.3f}x (dense2moe {rows[-1]['latency_ratio_dense2moe']:.3f}x)", flush=True)
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
            continue
        student = load_transformer(info)
        t = time.perf_counter()
        state = dicompress.compress(student, moe_passes(method, args), calibration=store, teacher=teacher,
                                    progress=False)
        secs = time.perf_counter() - t
        rep = state.report["passes"][-1]
        if method == "dense2moe" and "dense2moe+mob" in args.methods:
            kept["dense2moe"] = (copy.deepcopy(student), rep, secs)        # MoB trains on this very model
        m, imgs = evaluate_digits(student, teacher, info.path, teacher_samples=images["teacher"], **common)
        samples[method] = scorer(imgs["student"])
        write_samples(sidecar_path(args.out, partial=True), samples)
        row = {"kind": "quality", "method": method,
               **{k: rep[k] for k in ("activated_ffn_param_fraction", "activated_ffn_param_fraction_model",
                                      "activated_param_fraction", "oracle_topk_coverage", "router_topk_coverage",
                                      "router_recall", "load_max_over_mean")},
               "skipped_block_fraction": 0.0,
               "class_acc": m["class_acc"], "class_acc_teacher": base["class_acc_teacher"],
               "frechet": round(m["frechet"], 4), "frechet_teacher": round(base["frechet_teacher"], 4),
               "psnr_db": round(m["psnr_db"], 3), "latency_ratio": round(latency_ratio(student, teacher, cond), 4),
               "distill_seconds": round(secs, 1), "distill_loss": rep.get("distill_loss")}
        rows.append(row)
        print(f"{method:18s} ffn {row['activated_ffn_param_fraction']:.3f} "
              f"(model {row['activated_ffn_param_fraction_model']:.3f})  acc {row['class_acc']:.3f} "
              f"({row['class_acc_teacher']:.3f})  frechet {row['frechet']:.2f} "
              f"({row['frechet_teacher']:.2f})  psnr {row['psnr_db']:.2f}  latency {row['latency_ratio']:.3f}x  "
              f"{secs:.0f} s", flush=True)
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    settings = {"model": args.model, "calibration": str(Path(args.calibration).resolve().relative_to(ROOT))
                if Path(args.calibration).resolve().is_relative_to(ROOT) else args.calibration,
                "calibration_rows": int(store.model_inputs()["hidden_states"].shape[0]),
                "experts": args.experts, "top_k": args.top_k, "shared_fraction": args.shared_fraction,
                "balance_weight": args.balance_weight, "distill_steps": args.distill_steps,
                "e2e_steps": args.e2e_steps, "e2e_lr": args.e2e_lr, "e2e_batch_size": args.e2e_batch_size,
                "distill_lr": args.distill_lr, "batch_size": args.batch_size,
                "samples_per_class": args.samples_per_class}
    return rows, settings, samples


def mob_settings(args) -> dict:
    def distill(steps, lr):
        return {"steps": steps, "lr": lr, "batch_size": args.batch_size, "checkpoint_every": 0}
    return {"skip": args.mob_skip, "group_size": args.mob_group_size,
            "distill": distill(args.mob_router_steps, args.mob_router_lr), "budget_weight": 10.0, "temperature": 0.5,
            "recovery": distill(args.mob_recovery_steps, 1e-4),
            "end_to_end": {"steps": args.e2e_steps, "lr": args.e2e_lr, "batch_size": args.e2e_batch_size,
                           "checkpoint_every": 0} if args.e2e_steps else None}


def _mob_row(args, info, teacher, store, cfg, root, kept, base, images) -> dict:
    """dense2moe (the dense2moe row's model when it ran first in this run, else converted again with the same
    settings) then mob, trained on the calibration captured again on the MoE model (as a recipe does after a
    structural pass); bench_mob.mob_row evaluates it and times the dense2moe model in the same run."""
    from bench_mob import mob_row
    from dicompress.arch import adapter_for
    from dicompress.calib import capture
    from dicompress.models import load_transformer
    if "dense2moe" in kept:
        moe, rep, moe_secs = kept.pop("dense2moe")
    else:
        moe, t = load_transformer(info), time.perf_counter()
        state = dicompress.compress(moe, moe_passes("dense2moe", args), calibration=store, teacher=teacher,
                                    progress=False)
        rep, moe_secs = state.report["passes"][-1], time.perf_counter() - t
    store_moe = capture(moe, adapter_for(moe), cfg, {"name": info.name, "path": info.path}, root / "moe",
                        block_inputs=True, progress=False)
    row = mob_row(moe, teacher, store_moe, info.path, mob_settings(args), moe_report=rep,
                  teacher_images=images["teacher"], base=base, samples_per_class=args.samples_per_class)
    row["distill_seconds"] = round(row["distill_seconds"] + moe_secs, 1)     # both stages, as the other rows
    return row


def markdown(res: dict) -> str:
    lines = []
    kern = [r for r in res["rows"] if r["kind"] == "ffn_kernel"]
    if kern:
        lines += ["| FFN (batch 1) | tokens | activated FFN params | dense ms | MoE ms | MoE / dense | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for r in kern:
            lines.append(f"| {r['dim']} -> {r['hidden']}, shared {r['shared']} + top-{r['top_k']} of {r['experts']} "
                         f"| {r['tokens']} | {r['activated_ffn_param_fraction']:.3f} | {r['dense_ms']:.1f} | "
                         f"{r['moe_ms']:.1f} | {r['moe_over_dense']:.3f} | {r['speedup']:.2f}x |")
    qual = [r for r in res["rows"] if r["kind"] == "quality"]
    if qual:
        lines += ["", "| method | activated FFN params (converted / all FFNs) | activated params | skipped block "
                      "executions | router top-k coverage (oracle) | class acc (teacher) | Frechet (teacher) | PSNR dB "
                      "| latency vs teacher | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in qual:
            lines.append(f"| {r['method']} | {r['activated_ffn_param_fraction']:.3f} / "
                         f"{r['activated_ffn_param_fraction_model']:.3f} | {r['activated_param_fraction']:.3f} | "
                         f"{r.get('skipped_block_fraction', 0):.3f} | "
                         f"{r['router_topk_coverage']:.3f} ({r['oracle_topk_coverage']:.3f}) | {r['class_acc']:.3f} "
                         f"({r['class_acc_teacher']:.3f}) | {r['frechet']:.2f} ({r['frechet_teacher']:.2f}) | "
                         f"{r['psnr_db']:.2f} | {r['latency_ratio']:.3f}x | {r['distill_seconds']:.0f} |")
    lines += comparisons_markdown(res.get("comparisons", []))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/moe.json")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out of the kind skipped this time (e.g. "
                                                        "rerun only the kernel rows on a quieter machine) and the "
                                                        "quality rows of the methods not run this time")
    ap.add_argument("--model", default="zoo:tiny-flux-digits")
    ap.add_argument("--calibration", default=str(CALIBRATION))
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--shared-fraction", type=float, default=0.125)
    ap.add_argument("--balance-weight", type=float, default=0.01)
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--e2e-steps", type=int, default=600, help="end-to-end distillation steps after the per-block "
                                                               "distillation (every method but naive_split); 0 = none")
    ap.add_argument("--e2e-lr", type=float, default=2e-4)
    ap.add_argument("--e2e-batch-size", type=int, default=16)
    ap.add_argument("--mob-skip", type=float, default=0.25, help="dense2moe+mob: target skipped block executions")
    ap.add_argument("--mob-group-size", type=int, default=3)
    ap.add_argument("--mob-router-steps", type=int, default=300)
    ap.add_argument("--mob-router-lr", type=float, default=1e-2)
    ap.add_argument("--mob-recovery-steps", type=int, default=200, help="per group, then --e2e-steps end to end")
    ap.add_argument("--samples-per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared; more threads than free cores stall)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_avg = [round(x, 2) for x in os.getloadavg()]       # the CPU is shared: how busy it was when we began
    from dicompress.models import resolve_model
    rows, settings, samples = [], {}, {}
    if not args.skip_kernel:
        rows += kernel_rows(args.tokens, args.repeats)
    if not args.skip_quality:
        q, settings, samples = quality_rows(args)
        rows += q
    out, merged = Path(args.out), None
    with locked(out):                     # two runs of this bench merging into one --out: one after the other
        if args.merge and out.exists():
            old = json.loads(out.read_text())
            skipped = {"ffn_kernel"} if args.skip_kernel else set()
            skipped |= {"quality"} if args.skip_quality else set()
            ran = {r.get("method") for r in rows if r["kind"] == "quality"}
            rows = [r for r in old["rows"] if r["kind"] in skipped or (r["kind"] == "quality" and
                                                                      r["method"] not in ran)] + rows
            order = {m: i for i, m in enumerate(METHODS)}
            rows.sort(key=lambda r: (r["kind"] != "ffn_kernel", order.get(r.get("method"), len(order))))
            settings = settings or old.get("settings", {})
            load_avg = {"this_run": load_avg, "merged_rows_run": old["machine"].get("load_average_at_start")}
            merged = old.get("merged_from") or old["command"]
            kept = {m for m in (r.get("method") for r in rows if r["kind"] == "quality")} - set(samples)
            samples = {**{m: d for m, d in read_samples(sidecar_path(out)).items() if m in kept}, **samples}
        if samples:
            write_samples(sidecar_path(out), samples)
        else:
            sidecar_path(out).unlink(missing_ok=True)
        methods = [r["method"] for r in rows if r["kind"] == "quality"]
        comps = (comparisons(methods, samples, real_features(resolve_model(args.model).path))
                 if REFERENCE in methods else [])
        res = {"rows": rows, "comparisons": comps, "settings": settings, "command": "python " + " ".join(sys.argv),
               "merged_from": merged, "seconds": round(time.perf_counter() - t0, 1),
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count(), "load_average_at_start": load_avg,
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "dicompress": dicompress.__version__}}
        out.write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(res))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    sidecar_path(out, partial=True).unlink(missing_ok=True)
    print(markdown(res))


if __name__ == "__main__":
    main()
