"""Accuracy cost of the int8 GEMM path on the embedded model: TLQ levels decoded exactly (path (a), fp16
tensor cores on CUDA) vs mapped per row onto an int8 grid, w ≈ t_row · int8 (path (b), int8 tensor cores).

    python tools/bench_int8_mapping.py --out bench/int8_mapping.json      # also writes bench/int8_mapping.md

Quantizes zoo:tiny-flux-digits with the passes of the W4A8 recipe (recipes/tiny_flux_w4a8.yaml: smooth ->
ars -> tlq 4-bit per channel -> act_quant 8-bit; calibration from tools/bench_quant.py's capture_calibration,
the recipe's calibration set), then samples the same student twice, once per GEMM mode (on CPU mode
"decode" runs the pure-torch reference and mode "int8" the int8 GEMM, torch._int_mm on the int8-mapped
weights with int32 sums, the values and the arithmetic of the GPU's int8 kernel; `seconds`: each mode's
sampling time, with DICOMPRESS_KERNELS=reference both run the reference). Reports sample PSNR vs the
teacher for each, PSNR of (b) against (a), and the weight SQNR of the mapping per layer. 100 samples (10 per
class) by default, to stay within a few CPU minutes.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import ROOT, capture_calibration

import dicompress
from dicompress.eval import evaluate_digits
from dicompress.eval.metrics import psnr_db, sqnr_db
from dicompress.kernels import gemm_mode, int8_mapped_weight
from dicompress.models import load_transformer, resolve_model
from dicompress.nn.qlinear import QuantLinear
from dicompress.quant.codecs import get_codec


def mapping_sqnr(model) -> list[dict]:
    """Per quantized linear: SQNR (dB) of the int8-mapped weight against the exactly decoded one."""
    rows = []
    for name, q in model.named_modules():
        if isinstance(q, QuantLinear):
            exact = q.dequantize()
            scales, aux, eta = get_codec(q.codec).kernel_args.of(q)
            mapped = int8_mapped_weight(q.codes(), q.codec, scales, aux, eta, q.bits, q.group_size)
            rows.append({"module": name, "shape": [q.out_features, q.in_features],
                         "sqnr_db": round(sqnr_db(exact, mapped), 2)})
    return rows


def run(args) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    info = resolve_model(args.model)
    teacher = load_transformer(info)
    common = {"samples_per_class": args.samples_per_class, "progress": False}
    base, images = evaluate_digits(teacher, teacher, info.path, **common)
    store = capture_calibration(info, teacher)
    student = load_transformer(info)
    passes = yaml.safe_load((ROOT / args.recipe).read_text())["passes"]
    dicompress.compress(student, passes, calibration=store, progress=False)
    rows, samples = [], {}
    for mode in ("decode", "int8"):
        t = time.perf_counter()
        with gemm_mode(mode):
            m, im = evaluate_digits(student, teacher, info.path, teacher_samples=images["teacher"], **common)
        samples[mode] = im["student"]
        rows.append({"mode": mode, "psnr_db": round(m["psnr_db"], 3), "class_acc": m["class_acc"],
                     "frechet": round(m["frechet"], 4), "seconds": round(time.perf_counter() - t, 1)})
        print(f"{mode:7s} psnr {m['psnr_db']:.2f} dB  acc {m['class_acc']:.3f}  frechet {m['frechet']:.3f}", flush=True)
    layers = mapping_sqnr(student)
    sq = [r["sqnr_db"] for r in layers]
    return {"rows": rows, "psnr_int8_vs_decode_db": round(psnr_db(samples["int8"], samples["decode"]), 3),
            "teacher": {"class_acc": base["class_acc_teacher"], "frechet": round(base["frechet_teacher"], 4)},
            "mapping_sqnr_db": {"mean": round(sum(sq) / len(sq), 2), "min": min(sq), "max": max(sq),
                                "layers": layers},
            "settings": {"model": args.model, "recipe": args.recipe, "passes": passes,
                         "samples": 10 * args.samples_per_class,
                         "samples_per_class": args.samples_per_class},
            "command": "python " + " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1),
            "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__}}


def markdown(res: dict) -> str:
    s = res["settings"]
    steps = " -> ".join(next(iter(p)) for p in s["passes"])
    lines = [(f"{s['recipe']} ({steps}) on {s['model']}, "
              f"{s['samples']} samples ({s['samples_per_class']} per class)."), "",
             "| GEMM path | weights | PSNR vs teacher (dB) | class acc (teacher) | Frechet (teacher) "
             "| sampling s (CPU) |",
             "|---|---|---|---|---|---|"]
    label = {"decode": "(a) exact TLQ levels (fp16 TC)", "int8": "(b) int8-mapped levels (int8 TC)"}
    t = res["teacher"]
    for r in res["rows"]:
        lines.append(f"| {r['mode']} | {label[r['mode']]} | {r['psnr_db']:.2f} | {r['class_acc']:.3f} "
                     f"({t['class_acc']:.3f}) | {r['frechet']:.3f} ({t['frechet']:.3f}) | {r.get('seconds', '-')} |")
    m = res["mapping_sqnr_db"]
    lines += ["", (f"PSNR of (b) samples against (a) samples: {res['psnr_int8_vs_decode_db']:.2f} dB. "
                   f"Weight SQNR of the int8 mapping against the exact decode: mean {m['mean']:.2f} dB, "
                   f"min {m['min']:.2f}, max {m['max']:.2f} over {len(m['layers'])} layers.")]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/int8_mapping.json")
    ap.add_argument("--model", default="zoo:tiny-flux-digits")
    ap.add_argument("--recipe", default="recipes/tiny_flux_w4a8.yaml", help="its passes are applied")
    ap.add_argument("--samples-per-class", type=int, default=10)
    args = ap.parse_args()
    res = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
