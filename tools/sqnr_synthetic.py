"""Weight SQNR of TLQ and RTN (per output channel) on synthetic unit-variance matrices, beside the
scalar-quantizer limits of METHODS.md (Lloyd-Max = optimal scalar, best uniform = optimally clipped).

    .venv/bin/python tools/sqnr_synthetic.py --out bench/sqnr_synthetic.json

TLQ searches eta and the clip percentile on *all* n rows (its search is exact from per-row sorted
magnitudes, so no row subsample is needed); n = 4096 takes well under a minute per matrix on one core.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from dicompress.quant.tlq import tlq_quantize
from dicompress.quant.uniform import rtn_quantize

# METHODS.md, unit-variance source: (Lloyd-Max MSE, best-uniform MSE)
LIMITS_MSE = {("gaussian", 3): (0.03455, 0.03744), ("gaussian", 4): (0.009501, 0.01154),
              ("laplacian", 3): (0.05448, 0.07175), ("laplacian", 4): (0.01537, 0.02535)}


def unit_source(name: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """n x n i.i.d. samples of a zero-mean, unit-variance Gaussian or Laplacian."""
    if name == "gaussian":
        return torch.randn(n, n, generator=gen)
    u = torch.rand(n, n, generator=gen, dtype=torch.float64) - 0.5          # inverse CDF, scale b = 1/sqrt(2)
    return (-math.sqrt(0.5) * u.sign() * torch.log1p(-2 * u.abs())).float()


def _db(mse: float) -> float:
    return -10 * math.log10(mse)


def synthetic_sqnr_rows(bits=(3, 4), n: int = 4096, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for source in ("gaussian", "laplacian"):
        w = unit_source(source, n, gen)
        for b in bits:
            lm, uni = (_db(m) for m in LIMITS_MSE[(source, b)]) if (source, b) in LIMITS_MSE else (None, None)
            results = {}
            for method, fn in (("tlq_channel", tlq_quantize), ("rtn_channel", rtn_quantize)):
                t0 = time.perf_counter()
                _, _, info = fn(w, b)
                results[method] = {**info, "seconds": round(time.perf_counter() - t0, 2)}
            results["lloyd_max"] = {"sqnr_db": lm}
            results["uniform_limit"] = {"sqnr_db": uni}
            for method, r in results.items():
                sq = r["sqnr_db"]
                rows.append({"source": source, "bits": b, "method": method,
                             "sqnr_db": None if sq is None else round(sq, 3),
                             "lloyd_max_db": None if lm is None else round(lm, 3),
                             "uniform_limit_db": None if uni is None else round(uni, 3),
                             "gap_to_lloyd_max_db": None if sq is None or lm is None else round(lm - sq, 3),
                             **{k: r[k] for k in ("eta", "percentile", "seconds") if r.get(k) is not None}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the rows here as JSON (default: print)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = synthetic_sqnr_rows(tuple(args.bits), args.n, args.seed)
    text = json.dumps({"n": args.n, "seed": args.seed, "rows": rows}, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
