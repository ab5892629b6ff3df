"""bench_moe's per-sample sidecar and its paired comparisons (tools/bench_moe_samples.py) on synthetic data."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_moe_samples import (comparisons, comparisons_markdown, locked, read_samples,  # noqa: E402
                               sidecar_path, write_samples)


def student(rng, base, shift=0.0, noise=0.02, err=1e-3):
    n = len(base)
    return {"features": (base + shift + rng.normal(scale=noise, size=base.shape)).astype(np.float32),
            "mse": rng.lognormal(np.log(err), 0.5, size=n), "samples_per_class": 4}


def test_sidecar_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random((40, 8))
    samples = {"dense2moe": student(rng, base), "dense2moe+mob": student(rng, base)}   # "+" in a key
    path = sidecar_path(tmp_path / "moe.json")
    assert path.name == "moe.samples.npz"
    write_samples(path, samples)
    back = read_samples(path)
    assert set(back) == set(samples) and back["dense2moe+mob"]["samples_per_class"] == 4
    np.testing.assert_array_equal(back["dense2moe"]["features"], samples["dense2moe"]["features"])
    np.testing.assert_array_equal(back["dense2moe"]["mse"], samples["dense2moe"]["mse"])
    assert read_samples(tmp_path / "absent.npz") == {}
    with locked(tmp_path / "moe.json"):            # the merge lock can be taken (and is released)
        pass
    with locked(tmp_path / "moe.json"):
        pass


def test_comparisons_find_a_better_peer_and_report_missing_data():
    rng = np.random.default_rng(1)
    real = rng.random((400, 8))
    base = rng.random((60, 8))
    samples = {"dense2moe": student(rng, base, err=1e-3),
               "random_partition": student(rng, base, shift=0.4, err=4e-3),   # far from the real data, 6 dB worse
               "other_plan": {**student(rng, base), "samples_per_class": 5}}
    rows = comparisons(["dense2moe", "dense2moe+mob", "random_partition", "naive_split", "other_plan"], samples, real,
                       n_boot=300)
    by = {r["a"]: r for r in rows}
    assert set(by) == {"random_partition", "naive_split", "other_plan"}
    r = by["random_partition"]
    assert r["available"] and r["frechet_diff"] < 0 and r["frechet_high"] < 0 and r["frechet_b_lower"]
    assert r["psnr_diff_db"] > 0 and r["psnr_b_higher"]
    assert not by["naive_split"]["available"] and "naive_split" in by["naive_split"]["reason"]
    assert not by["other_plan"]["available"]
    table = "\n".join(comparisons_markdown(rows))
    assert "(lower)" in table and "unavailable" in table
