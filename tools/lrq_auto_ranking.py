"""Does lrq_auto's cheap error (nearest rounding of the weights) rank the candidates as GPTQ's error does?

    python tools/lrq_auto_ranking.py --w-bits 4 --a-bits 8 --include 'transformer_blocks.0.*' ...

Runs `lrq_auto` twice on the embedded model with the bench's calibration (error: rounding, then error: gptq) over
the selected layers and prints, per InputGroup, both rankings of the candidates, whether the pick agrees, and
Kendall's tau between the two orders; a JSON summary goes to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dicompress  # noqa: E402
from bench_quant import capture_calibration  # noqa: E402
from dicompress.models import load_transformer, resolve_model  # noqa: E402


def kendall_tau(a: dict, b: dict) -> float:
    keys = [k for k in a if a[k] is not None and b.get(k) is not None]
    pairs = list(combinations(keys, 2))
    agree = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs)
    return (2 * agree - len(pairs)) / len(pairs) if pairs else 1.0


def groups(state) -> dict:
    return {r["group"]: r for r in state.report["layers"] if r["method"] == "lrq_auto"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:tiny-flux-digits")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--include", nargs="+", default=["transformer_blocks.0.*", "single_transformer_blocks.4.*"])
    ap.add_argument("--out", default="/tmp/lrq_auto_ranking.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = resolve_model(args.model)
    store = capture_calibration(info, load_transformer(info))
    runs = {}
    for error in ("rounding", "gptq"):
        cfg = {"w_bits": args.w_bits, "a_bits": args.a_bits, "error": error, "include": args.include}
        runs[error] = groups(dicompress.compress(load_transformer(info), [{"lrq_auto": cfg}], calibration=store,
                                                 progress=False))
    out = []
    for g, r in runs["rounding"].items():
        q = runs["gptq"][g]
        a, b = r["candidates_sqnr_db"], q["candidates_sqnr_db"]
        out.append({"group": g, "pick_rounding": r["choice"], "pick_gptq": q["choice"],
                    "agree": r["choice"] == q["choice"], "kendall_tau": round(kendall_tau(a, b), 3),
                    "sqnr_db_rounding": a, "sqnr_db_gptq": b,
                    # what picking by rounding costs in GPTQ's own error
                    "gptq_db_lost": round(b[q["choice"]] - b[r["choice"]], 3)})
        print(f"{g:48s} rounding {r['choice']:22s} gptq {q['choice']:22s} tau {out[-1]['kendall_tau']:+.2f} "
              f"lost {out[-1]['gptq_db_lost']:.2f} dB", flush=True)
    summary = {"w_bits": args.w_bits, "a_bits": args.a_bits, "groups": len(out),
               "picks_agree": sum(o["agree"] for o in out),
               "mean_kendall_tau": round(sum(o["kendall_tau"] for o in out) / max(len(out), 1), 3),
               "mean_gptq_db_lost": round(sum(o["gptq_db_lost"] for o in out) / max(len(out), 1), 3), "rows": out}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print({k: v for k, v in summary.items() if k != "rows"})


if __name__ == "__main__":
    main()
