"""Dense2MoE (dicompress/moe, passes/dense2moe.py): the split and router math on plain tensors, the MoE FFN against
the dense FFN and a per-token reference, the pass, its artifact (also quantized) and its bad inputs."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from dicompress.moe import (MoEFFN, balanced_assign, expert_mass, fit_router, moe_from_dense, partition_cluster,
                            partition_importance, partition_random, router_recall, split_widths,
                            switch_balance_loss, topk_coverage)

# The MoE FFN at top_k = experts under a uniform router computes the dense FFN with the neurons summed in another
# order (per expert, then added): measured max |difference| ~1e-7 on outputs of magnitude ~1; asserted 1e-5 x max.
RTOL = 1e-5


def _dense(dim=16, hidden=64, seed=0):
    from diffusers.models.attention import FeedForward
    torch.manual_seed(seed)
    ffn = FeedForward(dim, dim_out=dim, inner_dim=hidden, activation_fn="gelu-approximate", bias=True).eval()
    with torch.no_grad():
        ffn.net[2].bias.normal_()
    return ffn


def _per_token(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Reference: every token on its own, its experts in a Python loop (what the grouped execution must equal)."""
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        idx, gates, _ = moe.route(t[None])
        y = moe.bias.clone() + (moe.shared(t) if moe.shared is not None else 0)
        for e, g in zip(idx[0].tolist(), gates[0]):
            y = y + g * moe.experts[e](t)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def test_split_widths_and_the_remainder_rule():
    assert split_widths(12288, 7, 0.125) == (1536, 1536)        # FLUX: 3 of 8 equal slices with top-2
    assert split_widths(512, 7, 0.125) == (64, 64)
    assert split_widths(100, 7, 0.1) == (16, 12)                # 10 shared + 6 left over join the shared expert
    assert split_widths(64, 4, shared_width=0) == (0, 16)
    with pytest.raises(ValueError, match="does not fit"):
        split_widths(64, 4, shared_width=64)
    with pytest.raises(ValueError, match="do not fit"):
        split_widths(64, 70, shared_width=0)


def test_partitions_cover_every_neuron_once():
    scores = torch.rand(64, generator=torch.Generator().manual_seed(0))
    act = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    for shared, experts in [partition_importance(scores, 8, 7, 8), partition_random(64, 8, 7, 8, seed=3),
                            partition_cluster(act, scores, 8, 7, 8)]:
        assert sorted(torch.cat([shared, *experts]).tolist()) == list(range(64))
        assert len(shared) == 8 and [len(e) for e in experts] == [8] * 7
    shared, experts = partition_importance(scores, 8, 7, 8)
    assert set(shared.tolist()) == set(scores.topk(8).indices.tolist())
    assert scores[experts[0]].min() > scores[experts[1]].max()     # contiguous chunks in score order
    assert not torch.equal(partition_random(64, 8, 7, 8, seed=3)[0], partition_random(64, 8, 7, 8, seed=4)[0])


def test_balanced_assign_fills_every_column_to_width():
    sim = torch.zeros(6, 3)
    sim[:, 0] = 1                                   # everyone prefers column 0
    sim[5, 0] = 2
    got = balanced_assign(sim, 2)
    assert torch.bincount(got, minlength=3).tolist() == [2, 2, 2] and got[5] == 0


def test_cluster_groups_neurons_that_fire_together():
    """Four groups of 8 neurons each fire on their own quarter of the tokens; importance order interleaves them.
    Clustering recovers the groups, so one expert carries each token's whole routed mass."""
    g = torch.Generator().manual_seed(0)
    n, t = 32, 400
    group = torch.arange(n) % 4                      # interleaved: importance chunks mix the groups
    token_group = torch.arange(t) % 4
    act = (token_group[:, None] == group[None]).float() * (1 + torch.rand(t, n, generator=g))
    scores = torch.linspace(2, 1, n)
    _, chunks = partition_importance(scores, 0, 4, 8)
    _, clusters = partition_cluster(act, scores, 0, 4, 8)
    assert sorted(sorted(group[c].tolist()) for c in clusters) == [[k] * 8 for k in range(4)]
    norms = torch.ones(n)
    assert topk_coverage(expert_mass(act, norms, clusters), 1) == pytest.approx(1.0)
    assert topk_coverage(expert_mass(act, norms, chunks), 1) < 0.5


def test_router_fit_picks_the_experts_with_the_most_mass():
    """Masses that are a linear function of the input: the least-squares router recovers their ranking."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=g)
    a = torch.randn(4, 12, generator=g)
    mass = (x @ a.T).exp()                           # positive, ranking = ranking of x @ a.T
    w, b = fit_router(x, mass)
    assert w.shape == (4, 12) and b.shape == (4,)
    logits = x @ w.T + b
    assert router_recall(logits, mass, 1) > 0.8
    assert router_recall(torch.randn(2000, 4, generator=g), mass, 1) < 0.4     # chance is 0.25
    assert topk_coverage(mass, 4) == pytest.approx(1.0)


def test_switch_balance_loss():
    uniform = torch.full((10, 4), 0.25)
    assert float(switch_balance_loss(uniform, torch.tensor([5, 5, 5, 5]))) == pytest.approx(1.0)
    one = torch.tensor([[1.0, 0, 0, 0]] * 10)
    assert float(switch_balance_loss(one, torch.tensor([20, 0, 0, 0]))) == pytest.approx(4.0)


def test_all_experts_and_a_uniform_router_give_the_dense_ffn():
    ffn = _dense()
    scores = torch.rand(64, generator=torch.Generator().manual_seed(2))
    shared, experts = partition_importance(scores, 8, 7, 8)
    moe = moe_from_dense(ffn, shared, experts, top_k=7)
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        ref, out = ffn(x), moe(x)
    assert (out - ref).abs().max() <= RTOL * ref.abs().max()
    # a top-2 MoE drops neurons: it differs
    moe2 = moe_from_dense(ffn, shared, experts, top_k=2)
    with torch.no_grad():
        assert (moe2(x) - ref).abs().max() > 100 * RTOL * ref.abs().max()
    # every expert holds plain linears the quantization passes find; the router is not one of them
    from dicompress.nn.surgery import iter_linears
    names = [n for n, _ in iter_linears(moe, ["*"])]
    assert len(names) == 16 and "router" not in " ".join(names)
    assert moe2.activated_params() == sum(p.numel() for p in moe2.parameters()) - 5 * (16 * 8 + 8 + 8 * 16)


@pytest.mark.parametrize("shared", [8, 0])
def test_grouped_execution_equals_the_per_token_reference(shared):
    ffn = _dense()
    g = torch.Generator().manual_seed(5)
    _, experts = partition_random(64, shared, 7, 8, seed=1) if shared else partition_random(64, 8, 7, 8, seed=1)
    rest = torch.cat(experts)
    if not shared:       # 7 x 8 of the 64 neurons, no shared expert
        experts = [rest[i * 8:(i + 1) * 8] for i in range(7)]
    router = (torch.randn(7, 16, generator=g), torch.randn(7, generator=g))
    moe = moe_from_dense(ffn, torch.arange(shared), experts, top_k=3, router=router)
    x = torch.randn(3, 20, 16, generator=g, requires_grad=True)
    out = moe(x)
    with torch.no_grad():
        ref = _per_token(moe, x)
    assert (out - ref).abs().max() <= RTOL * ref.abs().max()
    assert moe.aux_loss is not None and float(moe.aux_loss) >= 1 - 1e-6
    out.square().sum().backward()            # differentiable through gather / scatter and the gates
    assert x.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert sum(e.up.weight.grad is not None for e in moe.experts) >= 3       # 60 tokens x top-3 reach experts
