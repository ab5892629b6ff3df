"""The MoE FFN's Triton grouped GEMM (kernels/triton_moe.py through moe/grouped.py) against MoEFFN's own torch
loop. Without a GPU the `triton` tests run in Triton's CPU interpreter (TRITON_INTERPRET=1 from conftest.py,
grouped.interpreted() to take the path on CPU tensors); with one they run compiled on it. The packing and
dispatch tests are plain torch; the `gpu` tests run the FLUX-width comparisons of tools/bench_moe_gpu.py."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dicompress.moe import MoEFFN
from dicompress.moe.grouped import applies, grouped_routed_ffn, interpreted, pack_experts, packed_experts

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}    # the shapes below are not multiples of these
DIM, WIDTH = 40, 24


def make_moe(experts=5, top_k=2, approximate="tanh", dtype=torch.float32, shared=16, idle=(), seed=0):
    """A MoEFFN with random weights (all parameters ~ N(0, 0.3)); experts in `idle` are never routed to."""
    torch.manual_seed(seed)
    moe = MoEFFN(DIM, shared, WIDTH, experts, top_k, approximate=approximate)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        for e in idle:
            moe.router.bias[e] = -1e4
    return moe.to(DEV, dtype).eval()


def loop(moe, x, monkeypatch):
    """MoEFFN.forward's torch loop (DICOMPRESS_KERNELS=reference keeps it off the Triton path once it is wired)."""
    with monkeypatch.context() as m:
        m.setenv("DICOMPRESS_KERNELS", "reference")
        return moe(x)


def fp32_loop(moe, x, monkeypatch):
    """The loop of an fp32 copy of `moe`, routed as `moe` routes x (fp32 logits could break near-ties otherwise)."""
    ref = copy.deepcopy(moe).float()
    idx, gates, probs = moe.route(x)
    ref.route = lambda _: (idx, gates.float(), probs.float())
    return loop(ref, x.float(), monkeypatch)


def grouped(moe, x, blocks=SMALL):
    """MoEFFN.forward's arithmetic with the routed experts through grouped_routed_ffn."""
    idx, gates, _ = moe.route(x)
    with interpreted():
        routed = grouped_routed_ffn(moe, x, idx, gates, blocks=blocks)
    assert routed is not None and routed.shape == x.shape and routed.dtype == x.dtype
    out = moe.shared(x) if moe.shared is not None else torch.zeros_like(x)
    return out + moe.bias + routed


def rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


# -- the kernel path against the loop (interpreter on CPU) ------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("approximate,top_k", [("tanh", 2), ("none", 1)])
@torch.no_grad()
def test_fp32_matches_loop(approximate, top_k, monkeypatch):
    pytest.importorskip("triton")
    moe = make_moe(top_k=top_k, approximate=approximate)
    x = torch.randn(37, DIM, device=DEV)                           # 37 tokens: no multiple of BLOCK_M
    # fp32 everywhere, IEEE dots: only the summation order differs
    torch.testing.assert_close(grouped(moe, x), loop(moe, x, monkeypatch), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("approximate,dtype,top_k", [("tanh", torch.float16, 2), ("none", torch.bfloat16, 2),
                                                     ("tanh", torch.bfloat16, 1)])
@torch.no_grad()
def test_16bit_no_worse_than_loop(approximate, dtype, top_k, monkeypatch):
    """16-bit results round where the loop's do not (and vice versa), so both are compared with the fp32 loop on
    the same weights: the kernel keeps the hidden activations and the gated down-projection in fp32 until one
    rounding each, the loop rounds after each op. Measured here: fp16 ~5e-4, bf16 ~4e-3 for both (unit
    roundoff 2^-11, 2^-8; a few roundings per output); the bounds are the loop's error + 25% and 2 units."""
    pytest.importorskip("triton")
    moe = make_moe(top_k=top_k, approximate=approximate, dtype=dtype, seed=1)
    x = torch.randn(29, DIM, device=DEV).to(dtype)
    ref = fp32_loop(moe, x, monkeypatch)
    ours, theirs = rel_err(grouped(moe, x), ref), rel_err(loop(moe, x, monkeypatch), ref)
    unit = 2.0 ** -11 if dtype == torch.float16 else 2.0 ** -8
    assert ours <= 1.25 * theirs and ours < 2 * unit, (ours, theirs)


@pytest.mark.triton
@pytest.mark.parametrize("idle,top_k", [((1, 4), 2), ((0, 1, 3, 4, 5), 1)])   # the second: one expert takes all
@torch.no_grad()
def test_idle_experts(idle, top_k, monkeypatch):
    pytest.importorskip("triton")
    moe = make_moe(experts=6, top_k=top_k, idle=idle, seed=2)
    x = torch.randn(41, DIM, device=DEV)
    idx = moe.route(x)[0]
    counts = torch.bincount(idx.reshape(-1), minlength=6)
    assert counts[list(idle)].eq(0).all()
    torch.testing.assert_close(grouped(moe, x), loop(moe, x, monkeypatch), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_default_tiles(dtype, monkeypatch):
    """The tiles the library picks (triton_moe.tile), not the tests' small ones; no shared expert."""
    pytest.importorskip("triton")
    moe = make_moe(top_k=2, dtype=dtype, shared=0, seed=3)
    x = torch.randn(70, DIM, device=DEV).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(grouped(moe, x, None), loop(moe, x, monkeypatch), rtol=1e-5, atol=1e-5)
    else:
        ref = fp32_loop(moe, x, monkeypatch)
        assert rel_err(grouped(moe, x, None), ref) <= 1.25 * rel_err(loop(moe, x, monkeypatch), ref)


def _forward_calls_grouped() -> bool:
    return "grouped_routed_ffn" in MoEFFN.forward.__code__.co_names


@pytest.mark.triton
@pytest.mark.skipif(not _forward_calls_grouped(), reason="MoEFFN.forward does not call grouped_routed_ffn yet")
@torch.no_grad()
def test_forward_takes_the_grouped_path(monkeypatch):
    pytest.importorskip("triton")
    from dicompress.kernels import triton_moe
    moe = make_moe(seed=4)
    x = torch.randn(2, 9, DIM, device=DEV)                         # [batch, tokens, dim], as the blocks call it
    ref = loop(moe, x, monkeypatch)
    calls = []
    real = triton_moe.grouped_gemm
    monkeypatch.setattr(triton_moe, "grouped_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with interpreted():
        y = moe(x)
    assert len(calls) == 2                                         # up and down, one launch each
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# -- when the path applies ------------------------------------------------------------------------------
@pytest.mark.triton
def test_applies_only_where_it_should(monkeypatch):
    pytest.importorskip("triton")
    moe = make_moe()
    x = torch.randn(5, DIM, device=DEV)
    gates = moe.route(x)[1]
    with torch.no_grad(), interpreted():
        assert applies(moe, x, gates)                              # the positive control
        assert not applies(moe, x.double(), gates)                 # a dtype the kernel has no tile for
        with monkeypatch.context() as m:
            m.setenv("DICOMPRESS_KERNELS", "reference")
            assert not applies(moe, x, gates)
        handle = moe.experts[2].down.register_forward_pre_hook(lambda *a: None)   # a calibration capture
        assert not applies(moe, x, gates)
        handle.remove()
        assert applies(moe, x, gates)
        with monkeypatch.context() as m:                           # a quantized expert: not a plain nn.Linear
            m.setattr(moe.experts[1], "up", type("QuantLike", (nn.Linear,), {})(DIM, WIDTH, device=DEV))
            assert not applies(moe, x, gates)
    assert not applies(moe, x, gates)                              # gradients wanted (parameters require grad)
    if DEV == "cpu":
        with torch.no_grad():
            assert not applies(moe, x, gates)                      # CPU outside interpreted(): the torch loop


# -- packing ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_packing_keeps_outputs_state_dict_and_memory(monkeypatch):
    moe = make_moe(experts=4, seed=5)
    x = torch.randn(11, DIM, device=DEV)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    params = dict(moe.named_parameters())
    out = loop(moe, x, monkeypatch)
    assert packed_experts(moe) is None                             # separate tensors as built
    w1, b1, w2 = pack_experts(moe)
    assert dict(moe.named_parameters()) == params                  # the same Parameter objects
    after = moe.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(loop(moe, x, monkeypatch), out)
    assert w1.shape == (4, WIDTH, DIM) and b1.shape == (4, WIDTH) and w2.shape == (4, DIM, WIDTH)
    for e, ex in enumerate(moe.experts):                           # views of the packed buffers, held once
        assert ex.up.weight.data_ptr() == w1[e].data_ptr() and ex.down.weight.data_ptr() == w2[e].data_ptr()
        assert ex.up.bias.data_ptr() == b1[e].data_ptr()
        assert ex.up.weight.untyped_storage().nbytes() == w1.numel() * w1.element_size()
    assert pack_experts(moe)[0].data_ptr() == w1.data_ptr()        # packed already: no new copy
    # a load_state_dict copies into the parameters in place: still packed, the views see the new values
    new = {k: v + 1 for k, v in before.items()}
    moe.load_state_dict(new)
    again = packed_experts(moe)
    assert again is not None and again[0].data_ptr() == w1.data_ptr()
    assert torch.equal(again[2][3], new["experts.3.down.weight"])
    # a dtype move gives each parameter its own tensor: the layout is gone, the next pack rebuilds it
    moe.to(torch.float64)
    assert packed_experts(moe) is None
    assert pack_experts(moe)[0].dtype == torch.float64 and packed_experts(moe) is not None


def test_pack_inside_inference_mode_leaves_ordinary_parameters():
    moe = make_moe(experts=3, seed=6)
    with torch.inference_mode():
        pack_experts(moe)
    assert not moe.experts[0].up.weight.is_inference()
    with torch.no_grad():
        moe.experts[0].up.weight.add_(1)                           # in place outside inference mode: allowed


# -- compiled for the GPU without one (tools/aot_moe_kernels.py, in a subprocess: this process interprets) ------
ROOT = Path(__file__).resolve().parents[1]


def _aot(tmp_path, *args):
    triton = pytest.importorskip("triton")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip("this Triton build has no bundled ptxas / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "aot_moe_kernels.py"), "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and not [r for r in rows if "error" in r], rows
    for r in rows:           # no spills; tensor cores for 16-bit; both operands through the async copy pipeline
        assert r["stack_bytes"] == 0, r
        if "fp32" not in r["kernel"]:
            assert r["wgmma"] if r["arch"] >= 90 else r["mma_sync"], r
        assert r["async_copies"] == 2 * r["tile"]["num_stages"], r
        assert r["shared_bytes"] <= (227 if r["arch"] >= 90 else 99) * 1024, r
    return rows


@pytest.mark.triton
def test_flux_launches_compile_for_hopper(tmp_path):
    assert len(_aot(tmp_path, "--arch", "90", "--quick")) == 2


@pytest.mark.slow
def test_every_variant_compiles_for_hopper_and_ampere(tmp_path):
    from dicompress.kernels.triton_moe import TILE_CANDIDATES
    assert len(_aot(tmp_path, "--arch", "90", "86")) == 2 * 8 + 2 * (len(TILE_CANDIDATES) - 1)   # sweep: sm_90


# -- the GPU benchmark's comparisons (tools/bench_moe_gpu.py) ---------------------------------------------
def _bench():
    path = ROOT / "tools" / "bench_moe_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_moe_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_bench_exits_clearly_without_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        _bench().main(["--out", "/nonexistent/moe.json"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; a GPU runs the real one (gpu tests)")
def test_bench_smoke_runs_every_step(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from dicompress.kernels import triton_moe
    monkeypatch.setattr(triton_moe, "TILE_CANDIDATES", [{}, {"BLOCK_N": 256, "num_stages": 4}])   # 2 of them
    res = _bench().main(["--smoke", "--sweep", "--out", str(tmp_path / "moe.json")])
    assert [r["tile"] for r in res["sweep"]] == ["default", str({"BLOCK_N": 256, "num_stages": 4})]
    assert res["sweep"][1]["max_abs_diff_vs_default"] < 0.05 and res["sweep"][0]["vs_default"] == 1
    (row,) = res["rows"]
    assert row["moe_triton_ms"] > 0 and row["dense_ms"] > 0 and row["moe_loop_ms"] > 0
    assert row["rel_err_triton"] <= 1.25 * row["rel_err_loop"] < 2 * 2.0 ** -8, row      # bf16, as below
    assert abs(sum(row["load"]) - 1) < 0.01 and row["forward_takes_triton"] == _forward_calls_grouped()
    assert "| 37 |" in (tmp_path / "moe.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1024, 4096])
@torch.no_grad()
def test_flux_width_bf16_matches_and_beats_the_loop(tokens):
    """FLUX width (3072 -> 12288 -> 3072, shared 1536 + top-2 of 7 x 1536), bf16: the Triton path's error against
    the fp32 loop is at most the bf16 loop's + 25%, and at 4096 tokens it is faster than the loop."""
    bench = _bench()
    parts = bench.dense_parts(3072, 12288, torch.device("cuda"), torch.bfloat16)
    moe = bench.flux_moe(parts)
    x = torch.randn(tokens, 3072, device="cuda").bfloat16()
    ref = bench.fp32_reference(moe, x)
    ours, theirs = rel_err(bench.triton_forward(moe, x), ref), rel_err(bench.loop_forward(moe, x), ref)
    assert ours <= 1.25 * theirs and ours < 2 * 2.0 ** -8, (ours, theirs)
    if tokens == 4096:
        ms = bench.time_ms({"loop": lambda v: bench.loop_forward(moe, v),
                            "triton": lambda v: bench.triton_forward(moe, v)}, x, repeats=20)
        assert ms["triton"] < ms["loop"], ms


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_flux_width_packing_adds_no_memory():
    bench = _bench()
    moe = bench.flux_moe(bench.dense_parts(3072, 12288, torch.device("cuda"), torch.bfloat16))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    pack_experts(moe)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + (1 << 20)    # the experts' own tensors were freed
