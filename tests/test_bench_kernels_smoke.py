"""tools/bench_kernels.py --smoke: every section of the GPU benchmark (tile sweep, layers, FLUX-width stack)
runs end to end on the CPU at toy sizes, so the script a lent GPU runs is known to work before it gets there."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_smoke_run(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_kernels.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == [] and res["complete"] and res["sections_done"] == ["sweep", "layers", "model"]
    methods = {r["method"] for r in res["rows"]}
    modes = ("decode", "int8", "int8_unpacked")
    assert {"bf16", "dequant_matmul", "act_prep", "sweep_int8", "sweep_decode", "sweep_int8_unpacked",
            *(f"{part}_{mode}" for mode in modes for part in ("fused", "gemm", "w4a8"))} <= methods
    assert set(res["tiles_chosen"]) == {"int8", "float", "int8_unpacked"}
    for r in res["rows"]:
        assert r["ms"] > 0 and r["speedup_vs_bf16"] >= 0 and ("x" in r["shape"] or "@" in r["shape"])
        if r["method"].startswith("fused"):
            assert r["rel_err_vs_decode_reference"] < (0.05 if r["method"].startswith("fused_int8") else 1e-3)
    assert [b["need"] for b in res["bars"]] == [1.5, 2.0, 1.0]          # the three speed bars, read off
    assert all(isinstance(b["met"], bool) and b["ratio"] > 0 for b in res["bars"])
    md = out.with_suffix(".md").read_text()
    assert "| shape (MxKxN) |" in md and "| bar | path |" in md
