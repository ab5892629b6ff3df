"""Combine several runs of tools/bench_quant.py (each with --methods, same samples) into one table.

    python tools/bench_quant_combine.py RUN1.json RUN2.json ... --out bench/quant.json

Every row is deterministic given the code and the samples, so runs of disjoint method sets, made in parallel or
at different times, give the table one run would. A row measured in more than one run must agree (PSNR within
0.01 dB): a disagreement means the code changed between the runs and the combine stops. The per-sample MSE of
each row (RUN.mse.npz) comes along, and the paired comparisons are recomputed on the combined rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import comparisons, markdown, row_key  # noqa: E402  (tools/bench_quant.py)


def load_run(path: Path) -> tuple[dict, dict]:
    res = json.loads(path.read_text())
    side = path.with_suffix(".mse.npz")
    return res, (dict(np.load(side)) if side.exists() else {})


def combine(paths: list[Path]) -> dict:
    rows, mse, skipped, runs, settings, synthetic, teacher = {}, {}, {}, [], None, [], None
    for path in paths:
        res, side = load_run(path)
        s = {k: res["settings"][k] for k in ("model", "samples_per_class", "eval_seeds")}
        if settings is None:
            settings, teacher = dict(res["settings"]), res["teacher"]
        elif s != {k: settings[k] for k in s}:
            raise SystemExit(f"{path}: settings {s} differ from the first run's; rows are not on the same samples")
        for r in res["rows"]:
            k = row_key(r)
            if k in rows and abs(rows[k]["psnr_db"] - r["psnr_db"]) > 0.01:
                raise SystemExit(f"{k}: {rows[k]['psnr_db']} dB in one run, {r['psnr_db']} dB in {path}: the code "
                                 "changed between the runs; rerun one of them")
            rows[k] = r
            if k in side:
                mse[k] = side[k]
        for sk in res.get("skipped", []):
            skipped[(sk["method"], sk["w_bits"], sk["a_bits"])] = sk
        synthetic = res.get("synthetic_sqnr") or synthetic
        runs.append({"file": str(path), "command": res.get("command"), "seconds": res.get("seconds"),
                     "machine": res.get("machine")})
    measured = {(r["method"], r["w_bits"], r["a_bits"]) for r in rows.values()}   # a later run measured it
    skipped = {k: v for k, v in skipped.items() if k not in measured}
    return {"rows": list(rows.values()), "skipped": list(skipped.values()), "comparisons": comparisons(mse),
            "synthetic_sqnr": synthetic, "teacher": teacher, "settings": settings, "runs": runs,
            "command": "python " + " ".join(sys.argv)}, mse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="bench_quant --out files, in table order")
    ap.add_argument("--out", type=Path, default=Path("bench/quant.json"))
    ap.add_argument("--synthetic-from", type=Path, help="take the synthetic SQNR section from this earlier run "
                                                         "(it depends only on the TLQ/RTN weight quantizers)")
    args = ap.parse_args()
    res, mse = combine(args.runs)
    if args.synthetic_from:
        res["synthetic_sqnr"] = json.loads(args.synthetic_from.read_text())["synthetic_sqnr"]
        res["synthetic_sqnr_from"] = str(args.synthetic_from)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    np.savez_compressed(args.out.with_suffix(".mse.npz"), **{row_key(r): mse[row_key(r)] for r in res["rows"]
                                                             if row_key(r) in mse})
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
