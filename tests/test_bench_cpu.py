"""tools/bench_cpu.py at toy sizes: every row it reports is produced, the int8 rows carry the mapping's error
and decode's none, and the markdown renders. (The real run: python tools/bench_cpu.py, ~3 min.)"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

bc = pytest.importorskip("bench_cpu")


def test_bench_cpu_rows_at_toy_sizes(monkeypatch):
    monkeypatch.setattr(bc, "SHAPES", [(64, 48), (48, 40)])
    monkeypatch.setattr(bc.bk, "FLUX_WIDTH", dict(bc.bk.FLUX_WIDTH, attention_head_dim=16, num_attention_heads=2,
                                                  joint_attention_dim=32, pooled_projection_dim=16,
                                                  axes_dims_rope=(4, 6, 6)))
    rows = bc.bench_layers(8, 1) + bc.bench_stack(16, 1)
    methods = [r["method"] for r in rows]
    assert methods[:7] == ["fp32", "reference_decode", "reference_int8", "int8_mm", "int8_mm_gemm", "act_prep",
                           "act_prep_whole"]
    assert methods[-3:] == ["fp32", "w4a8_decode", "w4a8_int8"] and len(rows) == 17
    for r in rows:
        assert r["ms"] > 0 and r["speedup_vs_fp32"] > 0
        if r["method"] in ("reference_int8", "int8_mm"):
            assert 0 < r["rel_err"] < 0.05                    # the int8 mapping, not a wrong GEMM
    assert all(r["rel_err"] == 0 for r in rows if r["method"] == "reference_decode")
    md = bc.markdown({"rows": rows, "cpu": "x", "threads": 1, "torch": "t", "repeats": 1})
    assert md.count("\n| ") == len(rows) + 1
