"""Depth analysis: CKA and probe math, interval selection, the analysis on a real FLUX / Qwen-Image, the pass."""
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import dicompress
from dicompress.analysis import (
    DepthAnalysis,
    analyze_depth,
    bin_by_timestep,
    candidate_intervals,
    linear_cka,
    plot_depth,
    probe_error,
    select_intervals,
)
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.models import load_transformer, resolve_model
from dicompress.recipe import CalibrationConfig

CALIB = CalibrationConfig(source="classes", classes=[1, 7, 3], seeds=[0], steps=4, batch_size=3)


# -- pure math -------------------------------------------------------------------------------------------
def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)            # orthogonal map
    assert linear_cka(x, 3.7 * x + 5.0) == pytest.approx(1.0, abs=1e-10)    # isotropic scale, shift
    assert linear_cka(x, torch.randn(2000, 24, generator=g)) < 0.02         # independent noise
    anisotropic = x * torch.linspace(0.1, 3.0, 16)                           # not invariant to that
    assert linear_cka(x, anisotropic) < 0.95
    assert linear_cka(x, torch.ones(2000, 4)) == 0.0                        # no variance, no similarity
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, x[:10])


def test_probe_error_linear_and_nonlinear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=g)
    w, b = torch.randn(8, 12, generator=g), torch.randn(12, generator=g)
    assert probe_error(x, x @ w + b) < 1e-6                                  # affine: bias through the ones column
    assert probe_error(x, x @ w + b, holdout=0.25) < 1e-6
    assert probe_error(1e3 * x, x @ w) < 1e-6                                # ridge is relative to the input scale
    nonlinear = torch.cat([x.pow(2), x.abs(), (x[:, :1] * x[:, 1:2])], 1)   # even functions: no linear part
    assert probe_error(x, nonlinear) > 0.95
    partly = x @ w + 0.5 * x.pow(2) @ w
    assert 0.1 < probe_error(x, partly) < 0.9
    few = torch.randn(16, 32, generator=g)                                   # more channels than tokens:
    assert probe_error(few, torch.randn(16, 4, generator=g)) < 0.05          # in-sample fits noise ...
    assert probe_error(few, torch.randn(16, 4, generator=g), holdout=0.25) > 0.5   # ... held-out does not


def test_timestep_bins_have_equal_counts():
    t = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.6])
    groups, bins = bin_by_timestep(t, 4)
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    assert bins == [(pytest.approx(0.1), pytest.approx(0.2)), (pytest.approx(0.3), pytest.approx(0.5)),
                    (pytest.approx(0.6), pytest.approx(0.7)), (pytest.approx(0.8), pytest.approx(0.9))]


# -- interval selection ------------------------------------------------------------------------------------
BLOCKS = [f"transformer_blocks.{i}" for i in range(4)] + [f"single_transformer_blocks.{i}" for i in range(6)]


def fake_analysis(score, max_interval=4, blocks=BLOCKS):
    ivs = [{"start": s, "end": e, "score": score(s, e)} for s, e in candidate_intervals(blocks, max_interval)]
    return SimpleNamespace(blocks=blocks, intervals=ivs)


def test_candidate_intervals_stay_in_one_block_list():
    c = candidate_intervals(BLOCKS, 3)
    assert (2, 3) in c and (3, 4) not in c and (2, 4) not in c and (0, 2) in c and (0, 3) not in c
    assert all(2 <= e - s + 1 <= 3 for s, e in c)
    with pytest.raises(ValueError, match="max_interval"):
        candidate_intervals(BLOCKS, 1)


@pytest.mark.parametrize("n", [0, 1, 3, 5, 7])
def test_select_intervals_exact_and_disjoint(n):
    a = fake_analysis(lambda s, e: ((s * 7 + e * 3) % 5) / (e - s))
    chosen = select_intervals(a, n)
    assert sum(e - s for s, e in chosen) == n
    covered = [i for s, e in chosen for i in range(s, e + 1)]
    assert len(covered) == len(set(covered))
    assert all(b.rsplit(".", 1)[0] == BLOCKS[s].rsplit(".", 1)[0] for s, e in chosen for b in BLOCKS[s:e + 1])


def test_select_intervals_follows_the_score_and_avoids_dead_ends():
    # the best interval [0, 1] removes one block; removing 3 of 4 blocks needs [0, 3], so it must be skipped
    a = fake_analysis(lambda s, e: 0.0 if (s, e) == (0, 1) else 1.0 + s, blocks=BLOCKS[:4])
    assert select_intervals(a, 1) == [(0, 1)]
    assert select_intervals(a, 3) == [(0, 3)]
    with pytest.raises(ValueError, match="cannot remove exactly 4"):
        select_intervals(a, 4)
    # 10 blocks in lists of 4 and 6 with intervals of <= 4: at most (4 - 1) + (6 - 2) = 7
    big = fake_analysis(lambda s, e: 1.0)
    assert sum(e - s for s, e in select_intervals(big, 7)) == 7
    with pytest.raises(ValueError, match="at most 7"):
        select_intervals(big, 8)


def _brute_force_min_total(a, n):
    """Least total error over every set of disjoint intervals removing exactly n blocks (small cases)."""
    from itertools import combinations
    ivs = [(iv["start"], iv["end"], iv["score"] * (iv["end"] - iv["start"])) for iv in a.intervals]
    best = None
    for size in range(0, n + 1):
        for combo in combinations(ivs, size):
            if sum(e - s for s, e, _ in combo) != n:
                continue
            covered = [i for s, e, _ in combo for i in range(s, e + 1)]
            if len(covered) == len(set(covered)):
                total = sum(err for _, _, err in combo)
                best = total if best is None or total < best else best
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 3, 5])
def test_select_min_total_is_the_least_total_error(seed, n):
    from dicompress.analysis.intervals import select_min_total
    g = torch.Generator().manual_seed(seed)
    errs = {iv: float(torch.rand(1, generator=g)) for iv in candidate_intervals(BLOCKS, 3)}
    a = fake_analysis(lambda s, e: errs[(s, e)] / (e - s), max_interval=3)
    chosen = select_min_total(a, n)
    assert sum(e - s for s, e in chosen) == n
    covered = [i for s, e in chosen for i in range(s, e + 1)]
    assert len(covered) == len(set(covered)) and chosen == sorted(chosen)
    assert sum(errs[iv] for iv in chosen) == pytest.approx(_brute_force_min_total(a, n))


def test_select_min_total_avoids_the_greedy_dead_end_fill():
    """Removing 4: the greedy takes the best per-block interval [0, 3] (removes 3) and must then fill one more
    block with a poor pair; the least total takes [4, 6] and [7, 9]."""
    from dicompress.analysis.intervals import select_min_total
    errs = {(0, 3): 0.03, (4, 6): 0.04, (7, 9): 0.04}
    a = fake_analysis(lambda s, e: errs.get((s, e), 1.0 if e - s == 1 else 10.0) / (e - s))
    greedy, least = select_intervals(a, 4), select_min_total(a, 4)
    assert (0, 3) in greedy and sum(errs.get(iv, 1.0) for iv in greedy) > 1
    assert least == [(4, 6), (7, 9)]
    with pytest.raises(ValueError, match="cannot remove exactly"):
        select_min_total(fake_analysis(lambda s, e: 1.0, blocks=BLOCKS[:4]), 4)


# -- on real models ------------------------------------------------------------------------------------------
def _zeroed_model(zoo_dir):
    """The test zoo FLUX with transformer_blocks.1 and single_transformer_blocks.0 made the identity: their AdaLN
    modulation linears are zeroed, so every gate is 0 and each block returns its inputs."""
    model = load_transformer(resolve_model(str(zoo_dir)))
    with torch.no_grad():
        for name in ("transformer_blocks.1.norm1.linear", "transformer_blocks.1.norm1_context.linear",
                     "single_transformer_blocks.0.norm.linear"):
            lin = model.get_submodule(name)
            lin.weight.zero_()
            lin.bias.zero_()
    return model


@pytest.fixture(scope="module")
def zoo_capture(tiny_zoo_dir, tmp_path_factory):
    torch.set_num_threads(2)
    model = _zeroed_model(tiny_zoo_dir)
    store = capture(model, adapter_for(model), CALIB, {"name": "tiny", "path": tiny_zoo_dir},
                    tmp_path_factory.mktemp("depth_calib") / "store", block_inputs=True, progress=False)
    return model, store


def test_analyze_depth_on_flux(zoo_capture):
    model, store = zoo_capture
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = analyze_depth(model, adapter_for(model), store, max_interval=3, timestep_bins=2, max_tokens=256,
                      progress=False)
    assert a.blocks == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                        "single_transformer_blocks.1"]
    assert a.streams == ["image", "text"] and a.rows == 12
    assert all(len(a.cka[s]) == len(a.cka_diff[s]) == 4 and a.cka_diff[s][0] == 0.0 for s in a.streams)
    assert len(a.timestep_bins) == 2 and a.timestep_bins[0][1] <= a.timestep_bins[1][0]
    assert {(iv["start"], iv["end"]) for iv in a.intervals} == {(0, 1), (2, 3)}     # never across the lists
    assert [iv["score"] for iv in a.intervals] == sorted(iv["score"] for iv in a.intervals)
    assert all(set(iv["probe_error"]) == {"image", "text", "combined"} for iv in a.intervals)
    assert max(a.baseline) < 1e-10                                   # the model's chain reproduces the capture

    imp = {r["block"]: r for r in a.importance}
    assert all(len(r["per_bin"]) == 2 and all(math.isfinite(v) and v >= 0 for v in r["per_bin"]) for r in a.importance)
    # the identity blocks: skipping them changes nothing, and their input is their output
    for name in ("transformer_blocks.1", "single_transformer_blocks.0"):
        assert imp[name]["importance"] < 1e-10
        assert a.cka["image"][a.blocks.index(name)] == pytest.approx(1.0, abs=1e-9)
    for name in ("transformer_blocks.0", "single_transformer_blocks.1"):
        assert imp[name]["importance"] > 1e-4
    assert set(a.ranked_blocks()[:2]) == {"transformer_blocks.1", "single_transformer_blocks.0"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # nothing changed

    rep = json.loads(json.dumps(a.to_report()))                       # JSON-able, and read back
    assert rep["ranked_blocks"] == a.ranked_blocks()
    again = DepthAnalysis.from_report(rep)
    assert again.ranked_blocks() == a.ranked_blocks() and again.timestep_bins == a.timestep_bins
    assert select_intervals(again, 2) == [(0, 1), (2, 3)]

    buf = io.BytesIO()
    plot_depth(a, buf)
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200


def test_depth_analysis_pass_reports(zoo_capture):
    model, store = zoo_capture
    state = dicompress.compress(model, [{"depth_analysis": {"max_interval": 2, "timestep_bins": 3,
                                                            "max_tokens": 128}}], calibration=store, progress=False)
    assert state.manifest == []
    rep = state.report["depth_analysis"]
    assert len(rep["importance"]) == 4 and len(rep["timestep_bins"]) == 3
    rows = [r for r in state.report["layers"] if r["method"] == "depth_analysis"]
    assert [r["module"] for r in rows] == rep["blocks"]
    assert {r["importance_rank"] for r in rows} == {0, 1, 2, 3} and all("cka_text" in r for r in rows)
    summary = state.report["passes"][-1]
    assert summary["pass"] == "depth_analysis" and summary["blocks"] == 4
    assert "transformer_blocks.1" in summary["least_important"]
    assert state.files["depth_analysis.png"].startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="needs calibration"):
        dicompress.compress(model, [{"depth_analysis": {}}], progress=False)


def test_analyze_depth_on_qwenimage(tiny_qwen_dir, tmp_path):
    torch.set_num_threads(2)
    model = load_transformer(resolve_model(str(tiny_qwen_dir)))
    cfg = CalibrationConfig(source="synthetic", seeds=[0], steps=2, batch_size=2)
    store = capture(model, adapter_for(model), cfg, {"name": "q", "path": tiny_qwen_dir}, tmp_path / "s",
                    block_inputs=True, progress=False)
    a = analyze_depth(model, adapter_for(model), store, max_interval=2, timestep_bins=2, progress=False)
    assert a.blocks == ["transformer_blocks.0", "transformer_blocks.1"] and a.streams == ["image", "text"]
    assert max(a.baseline) < 1e-10 and all(r["importance"] > 0 for r in a.importance)
    assert [(iv["start"], iv["end"]) for iv in a.intervals] == [(0, 1)]
