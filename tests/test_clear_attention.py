"""CLEAR's linear-cost execution paths (clear/tiled.py, clear/cpu_local.py) and the dispatch in clear/attention.py,
against the dense masked reference (clear/window.py): values and gradients, odd grids, radii beyond the grid, pooled
keys, bf16."""

import pytest
import torch

from dicompress.clear import clear_attention, clear_mask, reference_clear_attention
from dicompress.clear.attention import clear_path, path_flops
from dicompress.clear.cpu_local import cpu_clear_attention, local_flops, local_plan
from dicompress.clear.tiled import halo, tiled_clear_attention, tiled_flops, window_mask

def _qkv(b, n, heads, d, pooled=0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, heads, d, generator=g, dtype=dtype) for _ in range(3))
    pk = pv = None
    if pooled:
        pk, pv = (torch.randn(b, pooled, heads, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, pk, pv

# (grid, radius, n_text, pooled, tile): tiles that do not divide the grid, 1-row grids, aspect ratios, radius
# below 1 cell, fractional radius, radius beyond the grid, no text at all (padding queries then see no global key)
CASES = [((7, 9), 3, 4, 0, 4), ((1, 13), 2.5, 3, 2, 4), ((9, 7), 1, 0, 0, 2), ((8, 8), 20, 5, 3, 4),
         ((5, 11), 1.5, 0, 0, 4), ((6, 6), 4, 2, 4, 8), ((13, 1), 3, 2, 0, 4), ((10, 12), 3.2, 6, 0, 3)]

@pytest.mark.parametrize("grid,radius,n_text,pooled,tile", CASES)
def test_tiled_matches_reference(grid, radius, n_text, pooled, tile):
    n = n_text + grid[0] * grid[1]
    q, k, v, pk, pv = _qkv(2, n, 3, 8, pooled)
    kw = dict(n_text=n_text, grid=grid, radius=radius, pooled_key=pk, pooled_value=pv)
    ref = reference_clear_attention(q, k, v, **kw)
    out = tiled_clear_attention(q, k, v, tile=tile, **kw)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

@pytest.mark.parametrize("grid,radius,n_text,pooled,tile", [CASES[0], CASES[1], CASES[2], CASES[3]])
def test_tiled_gradients_match_reference(grid, radius, n_text, pooled, tile):
    n = n_text + grid[0] * grid[1]
    leaves = [t.requires_grad_() for t in _qkv(1, n, 2, 4, pooled) if t is not None]
    q, k, v, *p = leaves
    pk, pv = p if p else (None, None)
    kw = dict(n_text=n_text, grid=grid, radius=radius, pooled_key=pk, pooled_value=pv)
    up = torch.randn(1, n, 2, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref, out = reference_clear_attention(q, k, v, **kw), tiled_clear_attention(q, k, v, tile=tile, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)    # the autograd path's forward (not the no-grad one)
    g_ref = torch.autograd.grad((ref * up).sum(), leaves)
    g_til = torch.autograd.grad((out * up).sum(), leaves)
    for a, b in zip(g_til, g_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

def test_tiled_gradcheck():
    """Finite differences on the tiled path itself (not only agreement with the reference)."""
    q, k, v, pk, pv = _qkv(1, 1 + 8, 1, 2, pooled=1, seed=3)
    fn = lambda *t: tiled_clear_attention(*t[:3], n_text=1, grid=(2, 4), radius=1.5, pooled_key=t[3],
                                          pooled_value=t[4], tile=2)
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v, pk, pv)))

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_tiled_low_precision_inputs(dtype, tol):
    """fp32 and bf16 inputs give their dtype back; bf16 upcasts scores to fp32 for the softmax, so its error
    against the fp64 reference stays at bf16 rounding of the inputs and the matmuls."""
    grid, n_text = (11, 10), 5
    q, k, v, pk, pv = _qkv(1, n_text + 110, 4, 16, pooled=2)
    ref = reference_clear_attention(q, k, v, n_text=n_text, grid=grid, radius=4, pooled_key=pk, pooled_value=pv)
    args = [t.to(dtype) for t in (q, k, v, pk, pv)]
    out = tiled_clear_attention(*args[:3], n_text=n_text, grid=grid, radius=4, pooled_key=args[3],
                                pooled_value=args[4])
    assert out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    assert err < tol * 10 and (out.double() - ref).abs().mean().item() < tol

def test_window_mask_is_the_circle_and_halo_clamps():
    assert halo(3, 100) == 2 and halo(2.5, 100) == 2 and halo(0.5, 100) == 0 and halo(50, 9) == 8
    m = window_mask((1, 1), (2, 2), 2.5).reshape(5, 5)     # one query at the window centre, r^2 = 6.25
    assert m.sum() == 21 and not m[0, 0] and m[0, 1] and m[0, 2] and m[2, 0]   # corners: 4 + 4 > 6.25
    # a tile's mask reproduces clear_mask's image block for every query of an 8x8 grid covered by one tile
    full = clear_mask(0, (6, 6), 3)
    win = window_mask((6, 6), (2, 2), 3).reshape(36, 10, 10)[:, 2:8, 2:8].reshape(36, 36)
    assert torch.equal(win, full)

@pytest.mark.parametrize("grid,radius,n_text,pooled,tile", CASES + [((21, 18), 5, 3, 2, 8)])
def test_cpu_local_matches_reference(grid, radius, n_text, pooled, tile):
    """The CPU kernel path (gathered union of circles + global keys merged by log-sum-exp) in fp64: tiles that do
    not divide the grid, border tiles, a grid with interior tiles (21x18 at r=5, tile 8: the shared-mask chunks)."""
    n = n_text + grid[0] * grid[1]
    q, k, v, pk, pv = _qkv(2, n, 3, 8, pooled)
    kw = dict(n_text=n_text, grid=grid, radius=radius, pooled_key=pk, pooled_value=pv)
    out = cpu_clear_attention(q, k, v, tile=tile, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, reference_clear_attention(q, k, v, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_cpu_local_low_precision_inputs(dtype, tol):
    grid, n_text = (11, 10), 5
    q, k, v, pk, pv = _qkv(1, n_text + 110, 4, 16, pooled=2)
    ref = reference_clear_attention(q, k, v, n_text=n_text, grid=grid, radius=4, pooled_key=pk, pooled_value=pv)
    args = [t.to(dtype) for t in (q, k, v, pk, pv)]
    out = cpu_clear_attention(*args[:3], n_text=n_text, grid=grid, radius=4, pooled_key=args[3],
                              pooled_value=args[4], tile=4)
    assert out.dtype == dtype
    err = (out.double() - ref).abs()
    assert err.max().item() < tol * 10 and err.mean().item() < tol


def test_local_plan_is_the_union_of_circles():
    """A tile's key list is exactly the keys some query of the tile may see (no square corners), and the per-tile
    masks reproduce clear_mask's image block."""
    grid, radius, tile = (26, 23), 3.5, (4, 4)      # tile padding on both axes, interior tiles
    plan = local_plan(grid, radius, tile)
    full = clear_mask(0, grid, radius)
    for t in range(plan.index.shape[0]):
        rows = plan.queries[t][plan.query_real[t]]
        seen = full[rows].any(0).nonzero().squeeze(1)
        listed = plan.index[t][plan.key_inside[t]]
        assert torch.equal(listed.sort().values, seen)
        sub = plan.circle[plan.query_real[t]][:, plan.key_inside[t]]
        assert torch.equal(sub, full[rows][:, listed])
        # the tile's shared border-pattern mask: the circle on the grid, nothing off it, padding rows see all
        allowed = plan.allowed[plan.variant[t]]
        assert torch.equal(allowed[plan.query_real[t]][:, plan.key_inside[t]], sub)
        assert not allowed[plan.query_real[t]][:, ~plan.key_inside[t]].any()
        assert allowed[~plan.query_real[t]].all()
    assert 1 < plan.allowed.shape[0] < plan.index.shape[0]   # a few patterns shared by many tiles
    assert plan.index.shape[1] < (4 + 2 * 3) ** 2          # the square window's corners are cut


def test_flops_linear_in_tokens_and_dispatch():
    """Per-token cost of the linear paths is constant in the grid: 4x the tokens is < 4.1x the FLOPs (text rows
    grow with N too); dense grows ~16x. Small grids, where a window covers the grid, take the dense path; autograd
    (cpu_inference=False) takes the tiled path."""
    for count in (tiled_flops, local_flops):
        f64, f128 = (count(512, (g, g), 16, 0, 24, 128) for g in (64, 128))
        assert 3.5 < f128 / f64 < 4.1
    assert local_flops(512, (64, 64), 16, 0, 1, 1) < tiled_flops(512, (64, 64), 16, 0, 1, 1)
    assert clear_path(8, (8, 8), 3) == "dense" and clear_path(8, (8, 8), 3, cpu_inference=False) == "dense"
    assert clear_path(512, (64, 64), 8) == "cpu-local"
    assert clear_path(512, (64, 64), 8, cpu_inference=False) == "tiled"
    f128 = local_flops(512, (128, 128), 16, 0, 24, 128)
    assert path_flops(512, (128, 128), 16, 0, 24, 128) == f128
    n = 512 + 128 * 128
    assert 4 * 24 * 128 * n * n / f128 > 7     # the FLOP ratio behind the 6x time target at 128x128, r = 16


@pytest.mark.parametrize("grid,radius,n_text", [((8, 8), 3, 8), ((24, 20), 2, 3)])
def test_clear_attention_dispatch_matches_reference(grid, radius, n_text):
    q, k, v, pk, pv = _qkv(1, n_text + grid[0] * grid[1], 2, 8, pooled=2)
    kw = dict(n_text=n_text, grid=grid, radius=radius, pooled_key=pk, pooled_value=pv)
    torch.testing.assert_close(clear_attention(q, k, v, **kw), reference_clear_attention(q, k, v, **kw),
                               rtol=1e-10, atol=1e-10)


def test_clear_attention_gradients_take_the_differentiable_path():
    """With autograd recording, clear_attention's gradients equal the reference's (the tiled path); without, the
    CPU kernel path gives the same values."""
    grid, n_text = (24, 20), 3
    leaves = [t.requires_grad_() for t in _qkv(1, n_text + 480, 2, 8)[:3]]
    kw = dict(n_text=n_text, grid=grid, radius=2)
    up = torch.randn(1, n_text + 480, 2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_ref = torch.autograd.grad((reference_clear_attention(*leaves, **kw) * up).sum(), leaves)
    g_out = torch.autograd.grad((clear_attention(*leaves, **kw) * up).sum(), leaves)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(clear_attention(*leaves, **kw), reference_clear_attention(*leaves, **kw),
                                   rtol=1e-10, atol=1e-10)


def test_bad_shapes_and_radius_raise():
    q, k, v, _, _ = _qkv(1, 20, 1, 4)
    for fn in (tiled_clear_attention, cpu_clear_attention):
        with pytest.raises(ValueError, match="not 4 text"):
            fn(q, k, v, n_text=4, grid=(3, 5), radius=2)
        with pytest.raises(ValueError, match="radius"):
            fn(q, k, v, n_text=5, grid=(3, 5), radius=0)


def test_bench_ideal_flops_count_the_mask():
    """tools/bench_clear_scaling.ideal_flops (the exact masked count reported next to each row) equals the allowed
    pairs of clear_mask, border clipping included."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_clear_scaling import ideal_flops
    for grid, radius, n_text in [((7, 9), 3, 4), ((5, 5), 2.5, 0), ((4, 6), 30, 2)]:
        pairs = int(clear_mask(n_text, grid, radius).sum())
        assert ideal_flops(n_text, grid, radius, heads=1, head_dim=1) == 4 * pairs
