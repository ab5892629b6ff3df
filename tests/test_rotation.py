import math

import pytest
import torch

from dicompress.quant.hadamard import (apply_hadamard, block_hadamard, can_hadamard, fwht, hadamard_matrix,
                                       hadamard_plan, random_signs, randomized_hadamard)
from dicompress.quant.rotation import choose_rotation, outlier_aware_rotation, rms_J, zigzag_permutation

FLUX_QWEN_WIDTHS = (3072, 9216, 12288, 15360, 3584)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)                            # the shared machine is busy: keep these light


def sylvester_reference(n):
    """S[i, j] = (-1)^popcount(i & j), the closed form of Sylvester's construction."""
    i = torch.arange(n)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).double()


def persistent_outliers(c, tokens=256, k=3, mag=50.0, seed=0):
    """Gaussian bulk plus k salient channels that fire in every token with a fixed sign (~mag x the bulk)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, c, generator=g)
    idx = torch.randperm(c, generator=g)[:k]
    sign = torch.randint(0, 2, (k,), generator=g) * 2 - 1
    x[:, idx] = sign * mag * (1 + 0.1 * torch.randn(tokens, k, generator=g))
    return x


def channel_ratio(y):
    a = y.abs().amax(0)
    return float(a.max() / a.mean())


def test_every_buildable_order_up_to_1024_is_an_exact_hadamard():
    orders = [n for n in range(1, 1025) if can_hadamard(n)]
    assert {1, 2, 4, 12, 20, 28, 36, 44, 60, 1024}.issubset(orders)
    for n in orders:
        h = hadamard_matrix(n, torch.float64)
        signs = h * math.sqrt(n)
        assert torch.equal(signs.round().abs(), torch.ones(n, n, dtype=torch.float64)), n
        assert (signs - signs.round()).abs().max() < 1e-9, n
        assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12, n


def test_dit_widths_are_buildable_with_small_bases():
    assert [hadamard_plan(n).base for n in FLUX_QWEN_WIDTHS] == [12, 36, 12, 60, 28]
    assert all(can_hadamard(1 << k) for k in range(16))


@pytest.mark.parametrize("n", [12, 20, 36, 48, 60, 96, 640, 3072])
def test_apply_hadamard_equals_dense_product(n):
    x = torch.randn(5, n, dtype=torch.float64)
    h = hadamard_matrix(n, torch.float64)
    assert torch.allclose(apply_hadamard(x), x @ h, atol=1e-12)
    assert torch.allclose(apply_hadamard(x, n, transpose=True), x @ h.T, atol=1e-12)
    assert torch.allclose(apply_hadamard(x.float(), hadamard_plan(n)), (x @ h).float(), atol=1e-5)


def test_large_cpu_inputs_run_in_row_blocks_bit_for_bit(monkeypatch):
    """Tensors over 2 x _CPU_CHUNK_BYTES run in cache-sized row blocks: the same per-row ops, so the same bits."""
    from dicompress.quant import hadamard
    x = torch.randn(3, 70, 384)                                       # 315 KiB; rows in blocks of 2 KiB
    whole = (apply_hadamard(x), apply_hadamard(x, transpose=True))
    monkeypatch.setattr(hadamard, "_CPU_CHUNK_BYTES", 2048)
    assert torch.equal(apply_hadamard(x), whole[0]) and torch.equal(apply_hadamard(x, transpose=True), whole[1])
    monkeypatch.setattr(hadamard, "_CPU_CHUNK_BYTES", 256)
    assert torch.equal(apply_hadamard(x[0, 0]), whole[0][0, 0])       # a 1-D input runs whole


def test_fwht_buffers_give_the_plain_butterflies_bit_for_bit():
    """_fwht_unnormalised writes each stage into ping-pong buffers; the values are the textbook butterflies'
    (stack (a + b, a - b) per stage), and the caller's tensor is never written."""
    from dicompress.quant.hadamard import _fwht_unnormalised

    def butterflies(x):
        m, lead, h = x.shape[-1], x.shape[:-1], 1
        while h < m:
            y = x.reshape(*lead, m // (2 * h), 2, h)
            x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(*lead, m)
            h *= 2
        return x

    for x in (torch.randn(5, 12, 256), torch.randn(64, 6).t(), torch.randn(8).half(), torch.randn(3, 1)):
        keep = x.clone()
        assert torch.equal(_fwht_unnormalised(x), butterflies(x)) and torch.equal(x, keep)
    x = torch.randn(4, 12, 64, requires_grad=True)                  # with autograd: the same values, a gradient
    y = _fwht_unnormalised(x)
    y.square().sum().backward()
    assert torch.equal(y.detach(), butterflies(x.detach()))
    torch.testing.assert_close(x.grad, 2 * 64 * x.detach(), rtol=1e-4, atol=1e-3)   # S·Sᵀ = 64 I


def test_fwht_equals_sylvester_product():
    for k in range(11):
        n = 1 << k
        s = sylvester_reference(n)
        x = torch.randn(3, 2, n, dtype=torch.float64)
        assert torch.allclose(fwht(x), x @ s / math.sqrt(n), atol=1e-12), n
        assert torch.equal(hadamard_matrix(n, torch.float64) * math.sqrt(n), s), n
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(2, 12))


@pytest.mark.parametrize("n", [0, 3, 6, 10, 92, 100, 1004])
def test_unsupported_orders_raise_with_the_supported_list(n):
    assert not can_hadamard(n)
    with pytest.raises(ValueError, match=r"Supported: powers of two.*Paley I.*Paley II"):
        hadamard_matrix(n)


def test_block_hadamard_is_orthonormal_and_block_diagonal():
    b = block_hadamard(48, 12, torch.float64)
    assert (b @ b.T - torch.eye(48, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(b[:12, 12:], torch.zeros(12, 36, dtype=torch.float64))
    assert torch.allclose(b[12:24, 12:24], hadamard_matrix(12, torch.float64))
    with pytest.raises(ValueError):
        block_hadamard(50, 12)


def test_randomized_hadamard_is_orthogonal_and_seed_deterministic():
    q = randomized_hadamard(96, seed=3, dtype=torch.float64)
    assert (q.T @ q - torch.eye(96, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(q, randomized_hadamard(96, seed=3, dtype=torch.float64))
    assert not torch.equal(q, randomized_hadamard(96, seed=4, dtype=torch.float64))
    s = random_signs(96, 3, torch.float64)
    assert torch.equal(s.abs(), torch.ones(96, dtype=torch.float64))
    x = torch.randn(4, 96, dtype=torch.float64)
    assert torch.allclose(x @ q, apply_hadamard(x * s), atol=1e-12)


def test_rms_J_matches_direct_rms_and_picks_the_rotation():
    x = 0.7 * torch.randn(4, 33, 64)
    flat = x.reshape(-1, 64)
    direct = float(x.pow(2).mean().sqrt())
    assert rms_J(flat.pow(2).sum(0), flat.shape[0]) == pytest.approx(direct, rel=1e-6)
    rms = (flat.pow(2).sum(0) / flat.shape[0]).sqrt()   # the store's per-channel form
    assert rms_J(rms ** 2, 1) == pytest.approx(direct, rel=1e-6)
    assert choose_rotation(0.7) == "hadamard" and choose_rotation(1.0) == "outlier_aware"
    assert choose_rotation(2.0, threshold=3.0) == "hadamard"


def test_zigzag_deals_large_channels_to_every_block():
    est = torch.zeros(64)
    est[:8] = torch.arange(8, 0, -1).float() + 10     # the 8 largest, all in the first block
    perm = zigzag_permutation(est, block=16)
    assert torch.equal(perm.sort().values, torch.arange(64))
    per_block = (est[perm].reshape(4, 16) > 5).sum(1)
    assert per_block.tolist() == [2, 2, 2, 2]


def test_outlier_aware_rotation_flattens_salient_channels_exactly():
    c = 512
    x = persistent_outliers(c)
    rot, info = outlier_aware_rotation(x.abs().amax(0), block=128, steps=256, seed=0)
    assert rot.dtype == torch.float32 and rot.shape == (c, c)
    assert (rot.T @ rot - torch.eye(c)).abs().max() < 1e-5
    assert info["salient"] == 3 and info["ratio_after"] < info["ratio_before"] / 5

    identity, rotated = channel_ratio(x), channel_ratio(x @ rot)
    had = x @ randomized_hadamard(c, seed=0)
    assert identity / rotated >= 5
    assert rotated <= channel_ratio(had)                # separated outliers do not stack, as they do in H
    assert (x @ rot).abs().max() <= had.abs().max()

    w = torch.randn(64, c, dtype=torch.float64)
    xd, rd = x.double(), rot.double()
    ref = xd @ w.T
    assert ((xd @ rd) @ (w @ rd).T - ref).norm() / ref.norm() < 1e-4

    again, _ = outlier_aware_rotation(x.abs().amax(0), block=128, steps=256, seed=0)
    assert torch.equal(rot, again)


def test_outlier_aware_rotation_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of block"):
        outlier_aware_rotation(torch.rand(200), block=128)


def test_outlier_aware_rotation_handles_flat_and_zero_statistics():
    for a in (torch.ones(256), torch.zeros(256)):
        rot, info = outlier_aware_rotation(a, block=64)
        assert (rot.T @ rot - torch.eye(256)).abs().max() < 1e-5
        assert info["salient"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("n", FLUX_QWEN_WIDTHS)
def test_full_width_hadamard_and_rotation(n):
    x = torch.randn(4, n)
    assert torch.allclose(apply_hadamard(x), x @ hadamard_matrix(n), atol=1e-5)
    a = torch.rand(n) + 3
    a[torch.randperm(n)[:8]] *= 50
    rot, info = outlier_aware_rotation(a)
    rows = torch.randperm(n)[:16]
    assert (rot[rows] @ rot.T - torch.eye(n)[rows]).abs().max() < 1e-5
    assert info["ratio_after"] < info["ratio_before"] / 10
