"""tools/bench_memory.py: the child-process measurement (peak RSS, failures, timeout) and the pure helpers
(recipe, per-block seconds, summary, projection, markdown). The full benchmark is not run here."""
from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_memory as bm  # noqa: E402

MIB = 1024 ** 2


def test_run_child_peak_rss(tmp_path):
    # 300 MiB written (so resident), held long enough for several 0.1 s samples
    code = "import time; b = b'x' * (300 * 1024 * 1024); time.sleep(0.6)"
    res = bm.run_child([sys.executable, "-c", code], tmp_path / "alloc", threads=1, timeout=60)
    assert res["ok"] and res["failure"] is None and res["error"] is None
    assert res["peak_rss_sampled_bytes"] >= 300 * MIB
    assert res["ru_maxrss_bytes"] >= 300 * MIB
    assert res["peak_rss_bytes"] == max(res["peak_rss_sampled_bytes"], res["ru_maxrss_bytes"])
    # the parent's memory is not counted by the sampler (ru_maxrss may include a large parent's pages up to the
    # exec, as under pytest with torch imported; the bench's parent imports no torch)
    assert res["peak_rss_sampled_bytes"] < 600 * MIB


def test_run_child_failure_and_timeout(tmp_path):
    res = bm.run_child([sys.executable, "-c", "import sys; sys.exit('boom')"], tmp_path / "fail", 1, 60)
    assert not res["ok"] and res["failure"] == "exit status 1" and "boom" in res["error"]
    res = bm.run_child([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "slow", 1, timeout=0.5)
    assert not res["ok"] and res["failure"].startswith("timed out") and res["seconds"] < 10


def test_child_threads(tmp_path):
    code = "import os; print('{\"omp\": \"%s\"}' % os.environ['OMP_NUM_THREADS'])"
    res = bm.run_child([sys.executable, "-c", code], tmp_path / "env", threads=3, timeout=60)
    assert bm.last_json(res["stdout"]) == {"omp": "3"}


def _args(**kw):
    base = {"seeds": [0], "steps": 2, "batch_size": 2, "no_streaming_key": False}
    return Namespace(**{**base, **kw})


def test_recipe_streaming_key_and_validity(tmp_path):
    from dicompress.recipe import parse_recipe
    rec = bm.recipe_for(_args(), "streaming", tmp_path / "m", tmp_path / "o", tmp_path / "c")
    assert rec["streaming"] == {"enabled": True, "propagate": "original"}
    assert bm.recipe_for(_args(), "naive", tmp_path, tmp_path, tmp_path)["streaming"] == {"enabled": False}
    plain = bm.recipe_for(_args(no_streaming_key=True), "naive", tmp_path, tmp_path / "o", tmp_path / "c")
    assert "streaming" not in plain
    recipe = parse_recipe(plain)   # everything but the streaming key validates today
    assert recipe.calibration.source == "synthetic" and recipe.device == "cpu"
    assert [next(iter(p)) for p in recipe.passes] == ["smooth", "ars", "tlq", "act_quant"]


def test_block_seconds():
    report = {"streaming": {"blocks": [{"block": "transformer_blocks.0", "stream": "double", "seconds": 2.0},
                                       {"block": "transformer_blocks.1", "stream": "double", "seconds": 4.0},
                                       {"block": "single_transformer_blocks.0", "stream": "single", "seconds": 1.0}]}}
    assert bm.block_seconds(report) == {"seconds_per_double_block": 3.0, "seconds_per_single_block": 1.0,
                                        "block_seconds_total": 7.0}
    assert set(bm.block_seconds({}).values()) == {None}


def _row(path, double, single, peak, seconds, ok=True, per_block=(None, None)):
    block_fp32 = 1000
    return {"path": path, "blocks": double + single, "double": double, "single": single, "ok": ok,
            "failure": None if ok else "exit status 2", "error": None if ok else "error: streaming: unknown key",
            "peak_rss_bytes": peak, "block_fp32_bytes": block_fp32, "peak_over_block_fp32": peak / block_fp32,
            "seconds": seconds, "seconds_per_double_block": per_block[0], "seconds_per_single_block": per_block[1],
            "block_seconds_total": double * per_block[0] + single * per_block[1] if per_block[0] else None}


SHAPES = {"bench": [{"tokens_per_row": {"image": 64, "text": 8}}] * 2,
          "flux1_dev": {"params": 100, "double_block_params": 10, "single_block_params": 4},
          "qwen_image": {"params": 120, "block_params": 20}}


def test_summary_criteria_and_projection():
    rows = [_row("streaming", 2, 4, 2000, 30.0, per_block=(3.0, 1.0)), _row("naive", 2, 4, 9000, 20.0),
            _row("streaming", 4, 8, 2100, 44.0, per_block=(3.0, 1.0)), _row("naive", 4, 8, 0, 0.0, ok=False)]
    loads = [{"path": "load_artifact", "blocks": 6, "ok": True, "seconds": 1.0, "seconds_until_read": 2.0},
             {"path": "load_bf16", "blocks": 6, "ok": True, "seconds": 0.1, "seconds_until_read": 4.0}]
    s = bm.summarize(rows, loads, SHAPES, _args())
    assert s["depth_doubling_rss_increase"] == pytest.approx(0.05) and s["depths_compared"] == [6, 12]
    assert s["streaming_peak_over_block_fp32"] == {"6": 2.0, "12": 2.1}
    assert s["load_artifact_over_bf16_seconds"] == {"6": 0.5}
    assert s["load_artifact_over_bf16_seconds_call_only"] == {"6": 10.0}
    assert [c["pass"] for c in s["criteria"]] == [True, True, True, True]
    p = s["projection"]
    overhead = 44.0 - (4 * 3.0 + 8 * 1.0)
    assert p["fixed_overhead_seconds"] == pytest.approx(overhead) and p["from_blocks"] == 12
    assert p["calibration"] == {"rows": 4, "tokens_per_row": 72, "image_tokens_per_row": 64,
                                "text_tokens_per_row": 8}
    assert p["flux1_dev"]["seconds"] == pytest.approx(overhead + 19 * 3.0 + 38 * 1.0)
    assert p["flux1_dev"]["peak_rss_bytes"] == 2100
    assert p["qwen_image"]["seconds"] == pytest.approx(overhead + 60 * 3.0 * 2.0)   # its block: 2x a double's


def test_markdown_with_failures_and_no_streaming():
    rows = [_row("naive", 2, 4, 9000, 20.0), _row("streaming", 2, 4, 0, 0.0, ok=False)]
    loads = [{"path": "load_bf16", "blocks": 6, "ok": True, "seconds": 0.1, "seconds_until_read": 4.0,
              "artifact_of": None, "peak_rss_bytes": 10, "bytes_on_disk": 10}]
    res = {"environment": {"threads": 2, "date": "today", "command": "python tools/bench_memory.py"},
           "settings": {"small": True},
           "models": [{"hidden": 256, "heads": 4, "head_dim": 64, "mlp_hidden": 1024}], "rows": rows,
           "load_rows": loads, "summary": bm.summarize(rows, loads, SHAPES, _args())}
    md = bm.markdown(res)
    assert "failed (exit status 2): error: streaming: unknown key" in md
    assert "n/a: depth_doubling_rss_increase" in md and "Projection: not available" in md
    json.dumps(res)   # the results stay JSON-serialisable


def test_worker_shapes_counts_real_blocks():
    out = bm.worker_shapes(json.dumps([bm.flux_config(1, 1, small=True)]))
    b = out["bench"][0]
    assert b["block_params_max"] == b["double_block_params"] > b["single_block_params"]
    assert b["tokens_per_row"] == {"image": 64, "text": 8}
    dev = out["flux1_dev"]
    assert dev["double_block_params"] == 339_831_296 and dev["single_block_params"] == 141_591_808
    assert 11e9 < dev["params"] < 13e9
