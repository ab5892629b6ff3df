"""What checking an artifact's checksums costs here: SHA-256 of a file (dicompress.io.checksums.sha256_file,
the function `verify`, `load(verify=True)` and the writer use), seconds per GiB, page cache warm.

    python tools/bench_checksum.py --out bench/checksum.json      # writes bench/checksum.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from dicompress.io.checksums import sha256_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gib", type=float, default=1.0, help="file size in GiB")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    size = int(args.gib * 2**30)
    with tempfile.TemporaryDirectory(prefix="dicompress-sha-") as work:
        path = Path(work) / "blob.bin"
        with open(path, "wb") as f:
            for _ in range(size // 2**24):
                f.write(os.urandom(2**24))
        sha256_file(path)                                   # warm the page cache, as a just-written file is
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            sha256_file(path)
            times.append(time.perf_counter() - t)
    gib = size / 2**30
    best = min(times)
    res = {"gib": gib, "seconds": [round(t, 3) for t in times], "seconds_per_gib": round(best / gib, 3),
           "gib_per_second": round(gib / best, 2), "machine": platform.processor() or platform.machine()}
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(
        "| file | best of %d | s per GiB | GiB/s |\n|---|---|---|---|\n| %.2f GiB | %.3f s | %.3f | %.2f |\n"
        % (args.repeats, gib, best, res["seconds_per_gib"], res["gib_per_second"]))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
