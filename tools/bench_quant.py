"""Quantization benchmark on the embedded model: every method, same calibration, seeds and classes.

    python tools/bench_quant.py --out bench/quant.json      # also writes bench/quant.md and bench/quant.mse.npz
    python tools/bench_quant.py --methods 'tlq+gptq*' hqq --merge   # rerun some methods, keep the other rows

Rows: one per method and setting (GPTQ rows use the calibration's block inputs), with sample PSNR vs the
teacher (same noise and class), class accuracy, Frechet distance of classifier features, and bytes. Model
bytes count every tensor that is not quantized at bf16 (the deployment dtype) and quantized linears at their
packed size.
A second section reports TLQ's weight SQNR on synthetic Gaussian / Laplacian matrices beside the
Lloyd-Max and uniform limits. Each row's per-sample MSE against the teacher is kept in bench/quant.mse.npz (keyed
like `row_key`), so the `comparisons` (paired PSNR differences with bootstrap intervals) can be recomputed.
"""
from __future__ import annotations

import argparse
import atexit
import json
import platform
import shutil
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicompress  # noqa: E402
from dicompress.arch import adapter_for  # noqa: E402
from dicompress.eval import bf16_bytes, evaluate_digits, quantized_linear_bytes  # noqa: E402
from dicompress.eval.paired import paired_psnr_difference, per_sample_mse  # noqa: E402
from dicompress.models import load_transformer, resolve_model  # noqa: E402
from dicompress.recipe import CalibrationConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def capture_calibration(info, teacher):
    """The calibration store of calibration/digits_10x2.yaml, captured on the teacher (cached)."""
    import tempfile

    from dicompress.calib import capture
    cfg = CalibrationConfig(**yaml.safe_load((ROOT / "calibration/digits_10x2.yaml").read_text()))
    root = Path(tempfile.mkdtemp(prefix="dicompress-bench-calib-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)      # the store is read until the bench ends
    return capture(teacher, adapter_for(teacher), cfg, {"name": info.name, "path": info.path}, root,
                   block_inputs=True, progress=False)   # block inputs: GPTQ's Hessians

# weight-only: (method, w_bits, group)
WEIGHT_ONLY = [("tlq", 4, None), ("tlq", 4, 64), ("tlq", 3, None), ("tlq", 3, 64),
               ("rtn", 4, None), ("rtn", 4, 64), ("rtn", 3, None), ("rtn", 3, 64)]
# weight-only with GPTQ error feedback (calibrated): method -> (weight pass, w_bits); `gptq` is the classic
# GPTQ (uniform grid), `tlq+gptq` the same feedback on TLQ's log grids
WEIGHT_GPTQ = [("tlq+gptq", "tlq", 4), ("tlq+gptq", "tlq", 3), ("gptq", "rtn", 4), ("gptq", "rtn", 3),
               ("tlq+gptq-aware", "tlq", 4), ("tlq+gptq-aware", "tlq", 3)]
# the weight pass's options besides bits and gptq: `tlq+gptq-aware` chooses each layer's grid by its output error
# after GPTQ (quant/tlq_output.py) instead of by weight MSE
WEIGHT_GPTQ_OPTIONS = {"tlq+gptq-aware": {"grid_search": "output"}}
# bits: auto (TLQ + GPTQ, a width per layer from its measured output error): (method, budget as the code bits
# of a uniform width, error weighting); the budget is the packed bytes of uniform TLQ+GPTQ at that width
WEIGHT_BUDGET = [("tlq-budget", 3, "relative"), ("tlq-budget-output", 3, "output"), ("tlq-budget", 4, "relative")]
# widths measured per layer: 7 and 8 bits left out for the bench's time (TLQ's grid search grows with 2^bits:
# on one 128x512 layer 8 bits take ~14x as long as 4); under W3 / W4 budgets a layer at 7 or 8 bits costs 3-5
# other layers of its size a bit each
BUDGET_CANDIDATES = [2, 3, 4, 5, 6]
# weights + activations (per-channel weights): method -> (passes before the weight quantizer, GPTQ on).
# Every row but `lrq-rounding` uses the same weight quantizer (TLQ + GPTQ), so `tlq`, `tlq+smooth` and
# `tlq+hadamard` isolate what smoothing and rotation add; `lrq-rounding` isolates what GPTQ adds.
W_A_METHODS = {"lrq": ([{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 1.0}}], True),
               "lrq-rounding": ([{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 1.0}}], False),
               "tlq": ([], True),
               "tlq+smooth": ([{"smooth": {"alpha": 0.5}}], True),
               "tlq+hadamard": ([{"ars": {"transform": "hadamard"}}], True)}
# `+zp`: the same recipe with asymmetric activations (act_quant zero_point: true; a zero point per token, no
# stored bytes), so the grid's share of a gain is measured apart from any per-layer choice
W_A_METHODS.update({f"{m}+zp": W_A_METHODS[m] for m in ("tlq", "tlq+smooth", "tlq+hadamard", "lrq")})
W_A = [("lrq", 4, 8), ("lrq", 3, 8), ("lrq", 4, 4), ("lrq", 3, 4), ("lrq-rounding", 4, 8), ("lrq-rounding", 4, 4),
       ("lrq-rounding", 3, 4), ("tlq", 4, 8), ("tlq", 4, 4), ("tlq+smooth", 4, 8), ("tlq+smooth", 4, 4),
       ("tlq+hadamard", 4, 8), ("tlq+hadamard", 4, 4), ("tlq+zp", 4, 4), ("tlq+smooth+zp", 4, 4),
       ("tlq+hadamard+zp", 4, 8), ("tlq+hadamard+zp", 4, 4), ("lrq+zp", 4, 4), ("lrq+zp", 3, 4)]


def _bytes(student, teacher_bf16: int, q_bytes: int, q_bf16: int) -> int:
    return teacher_bf16 - q_bf16 + q_bytes


def row_key(row: dict) -> str:
    """A row's identity across runs (--merge replaces the row with the same key): method, bits, granularity and
    the variant fields a method sweeps (rank, budget)."""
    parts = [row["method"], f"w{row['w_bits']}", f"a{row['a_bits'] or 16}", row["granularity"]]
    parts += [f"{k}={row[k]}" for k in VARIANT_FIELDS if row.get(k) is not None]
    return ":".join(parts)


VARIANT_FIELDS = ("rank", "budget")


class Bench:
    """What every section shares: the model, the teacher's samples, the calibration store (captured on first use),
    the method filter, and `add` (evaluate a student on the same samples and keep its row + per-sample MSE)."""

    def __init__(self, args):
        self.args = args
        self.info = resolve_model(args.model)
        self.teacher = load_transformer(self.info)
        self.teacher_bf16 = bf16_bytes(self.teacher)
        self.common = dict(samples_per_class=args.samples_per_class, progress=False)
        self.base, images = evaluate_digits(self.teacher, self.teacher, self.info.path, **self.common)
        self.teacher_samples = images["teacher"]
        self.rows, self.skipped, self.mse = [], [], {}
        self._store = None

    def write_partial(self) -> None:
        """A stopped or crashed run keeps its rows and per-sample MSE: `<out>.partial.json` (+ `.partial.mse.npz`)
        is a run file tools/bench_quant_combine.py accepts."""
        partial = Path(self.args.out).with_suffix(".partial.json")
        partial.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(partial.with_suffix(".mse.npz"), **self.mse)
        partial.write_text(json.dumps({"rows": self.rows, "skipped": self.skipped, "teacher": self.teacher_metrics(),
                                       "settings": settings(self.args), "command": "python " + " ".join(sys.argv),
                                       "partial": True}, indent=2) + "\n")

    def teacher_metrics(self) -> dict:
        return {k: self.base[k] for k in ("class_acc_teacher", "frechet_teacher")}

    def wants(self, method: str, w_bits: int | None = None) -> bool:
        if w_bits is not None and self.args.w_bits and w_bits not in self.args.w_bits:
            return False
        return not self.args.methods or any(fnmatch(method, p) for p in self.args.methods)

    def student(self):
        return load_transformer(self.info)

    @property
    def store(self):
        """The calibration store of calibration/digits_10x2.yaml (with block inputs: GPTQ's Hessians)."""
        if self._store is None:
            self._store = capture_calibration(self.info, self.teacher)
        return self._store

    def skip(self, method: str, w_bits, a_bits, reason: str, **extra) -> None:
        self.skipped.append({"method": method, "w_bits": w_bits, "a_bits": a_bits, "reason": reason, **extra})
        print(f"{method:12s} skipped: {reason}", flush=True)

    def add(self, method, w_bits, gran, student, q_bytes, q_bf16, seconds, extra=None, a_bits=None):
        m, images = evaluate_digits(student, self.teacher, self.info.path, teacher_samples=self.teacher_samples,
                                    **self.common)
        row = {"method": method, "w_bits": w_bits, "a_bits": a_bits, "granularity": gran,
               "psnr_db": round(m["psnr_db"], 3), "class_acc": m["class_acc"],
               "class_acc_teacher": self.base["class_acc_teacher"], "frechet": round(m["frechet"], 4),
               "frechet_teacher": round(self.base["frechet_teacher"], 4),
               "bytes": _bytes(student, self.teacher_bf16, q_bytes, q_bf16), "bytes_teacher": self.teacher_bf16,
               "bytes_quantized_linears": q_bytes, "bytes_quantized_linears_bf16": q_bf16,
               "ratio_quantized_linears": round(q_bytes / q_bf16, 4), "quantize_seconds": round(seconds, 2),
               **(extra or {})}
        self.rows.append(row)
        self.mse[row_key(row)] = per_sample_mse(images["student"], self.teacher_samples)
        self.write_partial()
        print(f"{method:12s} w{w_bits}a{a_bits or 16:<2} {gran:9s} psnr {row['psnr_db']:6.2f} dB  "
              f"acc {row['class_acc']:.3f} "
              f"(teacher {row['class_acc_teacher']:.3f})  frechet {row['frechet']:.3f}  "
              f"q-bytes {row['ratio_quantized_linears']:.3f}x bf16", flush=True)


def weight_only_rows(b: Bench) -> None:
    for method, bits, group in WEIGHT_ONLY:
        if not b.wants(method, bits):
            continue
        student = b.student()
        cfg = {"bits": bits, "granularity": "group" if group else "channel"}
        if group:
            cfg["group_size"] = group
        t = time.perf_counter()
        state = dicompress.compress(student, [{method: cfg}], progress=False)
        secs = time.perf_counter() - t
        q_bytes, q_bf16, _ = quantized_linear_bytes(student)
        sq = [r["sqnr_db"] for r in state.report["layers"]]
        b.add(method, bits, f"group{group}" if group else "channel", student, q_bytes, q_bf16, secs,
              {"mean_weight_sqnr_db": round(sum(sq) / len(sq), 3)})


def weight_gptq_rows(b: Bench) -> None:
    # the same calibration set the recipes use: every class x seeds 0, 1 x all 16 sampling steps
    for method, weight_pass, bits in WEIGHT_GPTQ:
        if not b.wants(method, bits):
            continue
        student = b.student()
        t = time.perf_counter()
        cfg = {"bits": bits, "gptq": True, **WEIGHT_GPTQ_OPTIONS.get(method, {})}
        state = dicompress.compress(student, [{weight_pass: cfg}], calibration=b.store, progress=False)
        secs = time.perf_counter() - t
        q_bytes, q_bf16, _ = quantized_linear_bytes(student)
        summary = next(p for p in state.report["passes"] if p["pass"] == weight_pass)
        extra = {"gptq_mean_output_gain_db": round(summary["gptq_mean_output_gain_db"], 3)}
        search = [r["grid_search_gain_db"] for r in state.report["layers"] if "grid_search_gain_db" in r]
        if search:   # output error after GPTQ: the weight-MSE grid vs the chosen one, mean over layers
            extra["grid_search_mean_gain_db"] = round(sum(search) / len(search), 3)
        b.add(method, bits, "channel", student, q_bytes, q_bf16, secs, extra)


def weight_budget_rows(b: Bench) -> None:
    for method, avg_bits, weighting in WEIGHT_BUDGET:
        if not b.wants(method, avg_bits):
            continue
        student = b.student()
        cfg = {"bits": "auto", "gptq": True,
               "budget": {"avg_bits": avg_bits, "weighting": weighting, "candidates": BUDGET_CANDIDATES}}
        t = time.perf_counter()
        state = dicompress.compress(student, [{"tlq": cfg}], calibration=b.store, progress=False)
        secs = time.perf_counter() - t
        q_bytes, q_bf16, _ = quantized_linear_bytes(student)
        s = next(p for p in state.report["passes"] if p["pass"] == "tlq")
        b.add(method, avg_bits, "channel", student, q_bytes, q_bf16, secs,
              {"budget": round(s["budget_bytes"] / q_bf16, 4), "weighting": weighting, "mean_bits": s["mean_bits"],
               "bits_histogram": s["bits_histogram"],
               "bits": {r["module"]: r["bits"] for r in state.report["layers"] if r["method"] == "tlq"}})


def weight_act_rows(b: Bench) -> None:
    for method, w_bits, a_bits in W_A:
        if not b.wants(method, w_bits):
            continue
        student = b.student()
        before, gptq = W_A_METHODS[method]
        act = {"bits": a_bits, **({"zero_point": True} if method.endswith("+zp") else {})}
        passes = [*before, {"tlq": {"bits": w_bits, "gptq": gptq}}, {"act_quant": act}]
        t = time.perf_counter()
        state = dicompress.compress(student, passes, calibration=b.store, progress=False)
        secs = time.perf_counter() - t
        q_bytes, q_bf16, _ = quantized_linear_bytes(student)
        rot = [r.get("transform") for r in state.report["layers"] if r.get("method") == "ars"]
        extra = {"passes": [next(iter(p)) for p in passes], "gptq": gptq, "act_zero_point": "zero_point" in act}
        if rot:
            extra["rotations"] = {k: rot.count(k) for k in sorted(set(rot))}
        b.add(method, w_bits, "channel", student, q_bytes, q_bf16, secs, extra, a_bits=a_bits)


# SVDQuant's 16-bit low-rank branch (tlq `lowrank_rank`) on a W4A4 recipe of W_A_METHODS: (method, base, rank).
# The zoo model is 128 wide: rank 32 is 25% of a hidden linear's rank (0.1-1% on FLUX.1's 3072), so rank 4 is
# measured too
LOWRANK = [("lrq+lowrank", "lrq", 4), ("lrq+lowrank", "lrq", 16), ("lrq+lowrank", "lrq", 32),
           ("tlq+hadamard+lowrank", "tlq+hadamard", 16), ("tlq+hadamard+lowrank", "tlq+hadamard", 32),
           ("lrq+lowrank+zp", "lrq+zp", 16)]


def lowrank_rows(b: Bench) -> None:
    for method, base, rank in LOWRANK:
        if not b.wants(method):
            continue
        student = b.student()
        before, gptq = W_A_METHODS[base]
        act = {"bits": 4, **({"zero_point": True} if base.endswith("+zp") else {})}
        passes = [*before, {"tlq": {"bits": 4, "gptq": gptq, "lowrank_rank": rank}}, {"act_quant": act}]
        t = time.perf_counter()
        dicompress.compress(student, passes, calibration=b.store, progress=False)
        secs = time.perf_counter() - t
        q_bytes, q_bf16, _ = quantized_linear_bytes(student)
        branch = sum(2 * m.lowrank_rank * (m.in_features + m.out_features) for m in student.modules()
                     if getattr(m, "lowrank_rank", 0))
        b.add(method, 4, "channel", student, q_bytes, q_bf16, secs,
              {"passes": [next(iter(p)) for p in passes], "gptq": gptq, "rank": rank, "bytes_lowrank_branch": branch},
              a_bits=4)


# lrq_auto (per-group transform chosen by the quantized output error at the row's bits), then TLQ + GPTQ, act_quant:
# (method, w_bits, a_bits, lrq_auto's error model); `lrq-auto-gptq` scores each candidate with GPTQ on the grid
# (the weight pass's own rounding) instead of nearest rounding; `+zp` rows also choose each input's activation
# grid (symmetric or zero point: lrq_auto zero_points [false, true])
LRQ_AUTO = [("lrq-auto", 4, 8, "rounding"), ("lrq-auto", 4, 4, "rounding"), ("lrq-auto", 3, 8, "rounding"),
            ("lrq-auto-gptq", 4, 4, "gptq"), ("lrq-auto+zp", 4, 8, "rounding"), ("lrq-auto+zp", 4, 4, "rounding")]


def lrq_auto_rows(b: Bench) -> None:
    for method, w_bits, a_bits, error in LRQ_AUTO:
        if not b.wants(method, w_bits):
            continue
        student = b.student()
        grids = [False, True] if method.endswith("+zp") else [False]
        passes = [{"lrq_auto": {"w_bits": w_bits, "a_bits": a_bits, "error": error, "zero_points": grids}},
                  {"tlq": {"bits": w_bits, "gptq": True}}, {"act_quant": {"bits": a_bits}}]
        t = time.perf_counter()
        state = dicompress.compress(student, passes, calibration=b.store, progress=False)
        secs = time.perf_counter() - t
        q_bytes, q_bf16, _ = quantized_linear_bytes(student)
        summary = next(p for p in state.report["passes"] if p["pass"] == "lrq_auto")
        b.add(method, w_bits, "channel", student, q_bytes, q_bf16, secs,
              {"passes": [next(iter(p)) for p in passes], "gptq": True, "error": error,
               "choices": summary["choices"], "zero_points": grids,
               **{k: summary[k] for k in ("output_sqnr_db", "best_uniform", "best_uniform_sqnr_db", "choice_gain_db")
                  if k in summary}}, a_bits=a_bits)


def peer_rows(b: Bench) -> None:
    from peers import apply_bnb_nf4, apply_quanto_w4a8, apply_sdnq  # noqa: E402  (tools/peers.py)

    from dicompress.zoo import load_conditioning  # noqa: E402
    from dicompress.zoo.sampler import sample  # noqa: E402
    cond = load_conditioning(b.info.path)
    cal = CalibrationConfig(**yaml.safe_load((ROOT / "calibration/digits_10x2.yaml").read_text()))
    pairs = [(c, s) for s in cal.seeds for c in cal.classes]

    def calibrate(model):   # quanto's calibration pass: the same classes, seeds and steps
        sample(model, cond, [c for c, _ in pairs], [s for _, s in pairs], steps=cal.steps)

    if b.wants("quanto"):
        student = b.student()
        a = adapter_for(student)
        t = time.perf_counter()
        res = apply_quanto_w4a8(student, a.quant_include, a.quant_keep, calibrate)
        b.add("quanto", 4, "group64" if res.get("group_size") == 64 else res.get("granularity", "-"), student,
              res["bytes"], res["bf16_bytes"], time.perf_counter() - t, {"setting": res.get("setting")}, a_bits=8)
    for a_bits in (None, 8) if b.wants("sdnq") else ():
        if a_bits == 8 and not b.args.sdnq_int8:
            b.skip("sdnq", 4, 8, "sdnq's int8 quantized matmul on CPU: a 500-sample evaluation did not finish in 21 "
                                 "CPU-minutes here (the fp32 rows take ~1.5); run with --sdnq-int8 to measure it")
            continue
        student = b.student()
        a = adapter_for(student)
        t = time.perf_counter()
        try:
            res = apply_sdnq(student, a.quant_include, a.quant_keep, w_bits=4, a_bits=a_bits)
        except NotImplementedError as e:
            b.skip("sdnq", 4, a_bits, str(e))
            continue
        b.add("sdnq", 4, res.get("granularity", "-"), student, res["bytes"], res["bf16_bytes"],
              time.perf_counter() - t, {"setting": res.get("setting")}, a_bits=a_bits)

    if b.wants("bnb-nf4"):
        student = b.student()
        a = adapter_for(student)
        t = time.perf_counter()
        res = apply_bnb_nf4(student, a.quant_include, a.quant_keep, blocksize=64)
        b.add("bnb-nf4", 4, "group64", student, res["bytes"], res["bf16_bytes"], time.perf_counter() - t)


def peer_extra_rows(b: Bench) -> None:
    """The strongest published peers (tools/peers_extra.py, tools/peers_autoround.py), each as its library ships
    it, on our selection and calibration set; one that cannot run on this CPU is listed with the reason."""
    import peers_extra as px  # noqa: E402
    from peers import apply_sdnq, calibration_runner  # noqa: E402
    from peers_autoround import apply_autoround  # noqa: E402
    cal = CalibrationConfig(**yaml.safe_load((ROOT / "calibration/digits_10x2.yaml").read_text()))
    calibrate = calibration_runner(b.info.path, cal.classes, cal.seeds, cal.steps, cal.batch_size)
    rows = {"torchao-int4wo": (4, None, "group128", lambda m, i, k: px.apply_torchao_int4wo(m, i, k)),
            "torchao-w4a8": (4, 8, "group32", lambda m, i, k: px.apply_torchao_w4a8(m, i, k)),
            "modelopt-w8a8-sq": (8, 8, "channel", lambda m, i, k: px.apply_modelopt(m, i, k, calibrate, "w8a8-sq")),
            "modelopt-w4a8-awq": (4, 8, "group128",
                                  lambda m, i, k: px.apply_modelopt(m, i, k, calibrate, "w4a8-awq")),
            "hqq": (4, None, "group64", lambda m, i, k: px.apply_hqq(m, i, k)),
            "autoround": (4, None, "group128", lambda m, i, k: apply_autoround(
                m, i, k, b.info.path, cal.classes, cal.seeds, cal.steps)),
            "sdnq-svd": (4, None, "svd-r32", lambda m, i, k: apply_sdnq(m, i, k, w_bits=4, use_svd=True))}
    for method, (w, a_bits, gran, apply) in rows.items():
        if not b.wants(method):
            continue
        student = b.student()
        a = adapter_for(student)
        t = time.perf_counter()
        try:
            res = apply(student, a.quant_include, a.quant_keep)
        except (ImportError, NotImplementedError, AssertionError) as e:   # a library that cannot run here
            b.skip(method, w, a_bits, f"{type(e).__name__}: {e}")
            continue
        secs = time.perf_counter() - t
        extra = {k: v for k, v in res.items() if k not in ("bytes", "bf16_bytes")}
        b.add(method, w, gran, student, res["bytes"], res["bf16_bytes"], secs, extra, a_bits=a_bits)


# the sections, in the order the table lists them; a new family of rows is one more function here
SECTIONS = [weight_only_rows, weight_gptq_rows, weight_budget_rows, weight_act_rows, lrq_auto_rows, lowrank_rows,
            peer_rows, peer_extra_rows]

# paired comparisons written beside the rows (b minus a, same samples; see dicompress/eval/paired.py): the
# issue's claims, each as (a's key, b's key); a pair whose rows are missing is listed as unavailable
COMPARISONS = [("gptq:w4:a16:channel", "tlq+gptq:w4:a16:channel"),
               ("gptq:w3:a16:channel", "tlq+gptq:w3:a16:channel"),
               ("gptq:w4:a16:channel", "tlq+gptq-aware:w4:a16:channel"),
               ("gptq:w3:a16:channel", "tlq+gptq-aware:w3:a16:channel"),
               ("tlq+gptq:w4:a16:channel", "tlq+gptq-aware:w4:a16:channel"),
               ("tlq+gptq:w3:a16:channel", "tlq+gptq-aware:w3:a16:channel"),
               ("tlq:w4:a8:channel", "lrq:w4:a8:channel"),
               # the published W4A8 peers against lrq-auto (issue 21)
               ("torchao-w4a8:w4:a8:group32", "lrq-auto:w4:a8:channel"),
               ("modelopt-w4a8-awq:w4:a8:group128", "lrq-auto:w4:a8:channel"),
               ("quanto:w4:a8:-", "lrq-auto:w4:a8:channel"),
               # the weight-only peers against the GPTQ-aware twin-log grid
               *[(f"{peer}:w4:a16:{gran}", "tlq+gptq-aware:w4:a16:channel")
                 for peer, gran in (("autoround", "group128"), ("torchao-int4wo", "group128"), ("hqq", "group64"),
                                    ("sdnq-svd", "svd-r32"), ("sdnq", "-"))],
               *[(f"{base}:w4:a4:channel", f"{m}:w4:a4:channel:rank={r}") for m, base, r in LOWRANK],
               *[("tlq+hadamard:w4:a4:channel", f"lrq+lowrank:w4:a4:channel:rank={r}") for r in (16, 32)],
               ("lrq+lowrank:w4:a4:channel:rank=16", "lrq+lowrank+zp:w4:a4:channel:rank=16"),
               *[(f"{m}:w{w}:a{a}:channel", f"lrq-auto:w{w}:a{a}:channel")
                 for w, a in ((4, 8), (4, 4)) for m in ("tlq", "tlq+smooth", "tlq+hadamard", "lrq")],
               *[(f"{m}:w4:a4:channel", "lrq-auto-gptq:w4:a4:channel") for m in ("lrq", "tlq+hadamard", "lrq-auto")],
               # the asymmetric activation grid: uniform (what the grid alone gives), and chosen per input
               *[(f"{m}:w4:a{a}:channel", f"{m}+zp:w4:a{a}:channel")
                 for m, a in (("tlq", 4), ("tlq+smooth", 4), ("tlq+hadamard", 4), ("tlq+hadamard", 8), ("lrq", 4))],
               ("lrq:w3:a4:channel", "lrq+zp:w3:a4:channel"),
               *[(f"{m}:w4:a4:channel", "lrq-auto+zp:w4:a4:channel")
                 for m in ("tlq", "tlq+smooth", "tlq+hadamard", "lrq", "lrq-auto", "tlq+zp", "tlq+smooth+zp",
                           "tlq+hadamard+zp", "lrq+zp")],
               *[(f"{m}:w4:a8:channel", "lrq-auto+zp:w4:a8:channel") for m in ("lrq-auto", "tlq+hadamard+zp")],
               ("tlq+gptq:w3:a16:channel", "tlq-budget:w3:a16:channel:budget=0.2152"),
               ("tlq+gptq:w4:a16:channel", "tlq-budget:w4:a16:channel:budget=0.2777"),
               ("tlq-budget-output:w3:a16:channel:budget=0.2152", "tlq-budget:w3:a16:channel:budget=0.2152")]


def comparisons(mse: dict) -> list[dict]:
    out = []
    for a, b in COMPARISONS:
        if a not in mse or b not in mse:
            out.append({"a": a, "b": b, "unavailable": [k for k in (a, b) if k not in mse]})
            continue
        d = paired_psnr_difference(mse[a], mse[b])
        out.append({"a": a, "b": b, **{k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}})
    return out


def merge_previous(out: Path, rows: list[dict], mse: dict, skipped: list[dict]) -> tuple[list, dict, list]:
    """The rows (and per-sample MSE) of an earlier run at `out`, with this run's rows replacing those of the same
    key: reruns of a few methods keep the rest of the table. The settings must match (same samples)."""
    if not out.exists():
        return rows, mse, skipped
    old = json.loads(out.read_text())
    side = out.with_suffix(".mse.npz")
    old_mse = dict(np.load(side)) if side.exists() else {}
    new = {row_key(r): r for r in rows}
    merged = [new.pop(row_key(r), r) for r in old["rows"]] + list(new.values())   # reruns keep their place
    gone = {r["method"] for r in rows}
    return (merged, {**{k: v for k, v in old_mse.items() if k not in mse}, **mse},
            [s for s in old.get("skipped", []) if s["method"] not in gone] + skipped)


def settings(args) -> dict:
    return {"model": args.model, "samples_per_class": args.samples_per_class,
            "eval_seeds": f"{1000}..{1000 + 10 * args.samples_per_class - 1}", "synthetic_n": args.synthetic_n}


def run(args) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    b = Bench(args)
    for section in SECTIONS:
        section(b)
    rows, mse, skipped = b.rows, b.mse, b.skipped
    out = Path(args.out)
    if args.merge:
        prev = json.loads(out.read_text()) if out.exists() else None
        if prev and prev["settings"]["samples_per_class"] != args.samples_per_class:
            raise SystemExit(f"--merge: {out} was run with samples_per_class {prev['settings']['samples_per_class']}")
        rows, mse, skipped = merge_previous(out, rows, mse, skipped)
    order = {row_key(r): i for i, r in enumerate(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out.with_suffix(".mse.npz"), **{k: mse[k] for k in order if k in mse})
    synthetic = None
    if not args.methods:
        from sqnr_synthetic import synthetic_sqnr_rows  # noqa: E402  (tools/sqnr_synthetic.py)
        synthetic = synthetic_sqnr_rows(bits=(3, 4), n=args.synthetic_n)
    elif args.merge and out.exists():
        synthetic = json.loads(out.read_text()).get("synthetic_sqnr")
    return {"rows": rows, "skipped": skipped, "comparisons": comparisons(mse), "synthetic_sqnr": synthetic or [],
            "teacher": b.teacher_metrics(), "settings": settings(args),
            "command": "python " + " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "dicompress": dicompress.__version__}}


def markdown(res: dict) -> str:
    lines = ["| method | W | A | granularity | PSNR vs teacher (dB) | class acc (teacher) | Frechet (teacher) "
             "| quantized linears vs bf16 | model bytes vs bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        variant = "".join(f" ({k} {r[k]})" for k in VARIANT_FIELDS if r.get(k) is not None)
        lines.append(f"| {r['method']}{variant} | {r['w_bits']} | {r['a_bits'] or '-'} | {r['granularity']} | "
                     f"{r['psnr_db']:.2f} | {r['class_acc']:.3f} ({r['class_acc_teacher']:.3f}) | "
                     f"{r['frechet']:.3f} ({r['frechet_teacher']:.3f}) | {r['ratio_quantized_linears']:.3f}x | "
                     f"{r['bytes'] / r['bytes_teacher']:.3f}x |")
    if res.get("skipped"):
        lines += ["", "| skipped | W | A | reason |", "|---|---|---|---|"]
        lines += [f"| {s['method']} | {s['w_bits']} | {s['a_bits'] or '-'} | {s['reason']} |" for s in res["skipped"]]
    if res.get("comparisons"):
        lines += ["", "| b | a | PSNR b - a (dB) | 95% bootstrap interval |", "|---|---|---|---|"]
        for c in res["comparisons"]:
            if "unavailable" in c:
                if len(c["unavailable"]) == 2:      # neither row in this run (a --methods subset): not worth a line
                    continue
                lines.append(f"| {c['b']} | {c['a']} | - | rows missing: {', '.join(c['unavailable'])} |")
            else:
                lines.append(f"| {c['b']} | {c['a']} | {c['diff_db']:+.2f} | [{c['low_db']:+.2f}, {c['high_db']:+.2f}]"
                             f"{'' if c['excludes_zero'] else ' (includes 0)'} |")
    if res["synthetic_sqnr"]:
        lines += ["", "| source | bits | method | SQNR (dB) | Lloyd-Max (dB) | best uniform (dB) | gap to Lloyd-Max (dB) |",
                  "|---|---|---|---|---|---|---|"]
    for r in res["synthetic_sqnr"]:
        lines.append(f"| {r['source']} | {r['bits']} | {r['method']} | {r['sqnr_db']:.2f} | "
                     f"{r['lloyd_max_db']:.2f} | {r['uniform_limit_db']:.2f} | {r['gap_to_lloyd_max_db']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/quant.json")
    ap.add_argument("--model", default="zoo:tiny-flux-digits")
    ap.add_argument("--samples-per-class", type=int, default=50)
    ap.add_argument("--synthetic-n", type=int, default=4096)
    ap.add_argument("--sdnq-int8", action="store_true",
                    help="also evaluate sdnq W4A8 (its int8 quantized matmul is very slow on CPU: skipped by default)")
    ap.add_argument("--w-bits", nargs="+", type=int, metavar="N",
                    help="only the rows of these weight widths, in the sections that sweep widths (e.g. 3)")
    ap.add_argument("--methods", nargs="+", metavar="GLOB",
                    help="run only the methods matching these fnmatch patterns (e.g. 'tlq*' hqq)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing --out, replacing those this run measures again (same samples)")
    args = ap.parse_args()
    res = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    out.with_suffix(".partial.mse.npz").unlink(missing_ok=True)
    print(md)


if __name__ == "__main__":
    main()
