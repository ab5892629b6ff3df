"""Training through a W4A8 artifact: activation rounding is straight-through, so the gradient reaching anything
upstream of a quantized linear (the model input, a LoRA-like parameter) is the one of a float model that
fake-quantizes with x + (q(x) - x).detach(); and torch.compile with gradients on traces without a graph break
in dicompress's code."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from torch import nn

import dicompress
from dicompress.arch import adapter_for
from dicompress.calib import capture
from dicompress.calib.config import CalibrationConfig
from dicompress.kernels.reference import transform_act
from dicompress.nn.act import TransformedLinear
from dicompress.nn.qlinear import QuantLinear
from dicompress.quant.activation import per_token_step, quantize_per_token

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
# smoothing and the randomised Hadamard folded in (threshold 1e9: every input group takes the Hadamard), RTN W4,
# per-token A8: every part of the W4A8 forward the straight-through path must get right
W4A8 = [{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 1e9, "block": 16}}, {"rtn": {"bits": 4}},
        {"act_quant": {"bits": 8}}]


def build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX).eval()


@pytest.fixture(scope="module")
def w4a8(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("training")
    model = build()
    store = capture(model, adapter_for(model), CalibrationConfig(source="synthetic", seeds=[0], steps=2,
                                                                 batch_size=2),
                    {"name": "tiny", "path": root}, root / "store", block_inputs=False, progress=False)
    state = dicompress.compress(model, W4A8, calibration=store, progress=False)
    dicompress.save(state, root / "a")
    model = dicompress.load(root / "a")
    assert any(isinstance(m, QuantLinear) and m.act is not None and m.act.act_bits == 8 for m in model.modules())
    return model


def ste_reference(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The textbook straight-through fake quantization: the rounded values forward, identity backward."""
    qmax = (1 << (bits - 1)) - 1
    step = per_token_step(x, bits)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = (x / safe).round().clamp(-qmax, qmax) * safe
    return x + (q - x).detach()


class FloatSTELinear(nn.Module):
    """A QuantLinear as a float layer: its decoded weight, its transform, the reference STE rounding."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.q, self.w = q, q.dequantize()

    def forward(self, x):
        act = self.q.act
        if act is not None:
            smooth = act.smooth if act.has_smooth else None
            signs = act.signs if act.rotation_kind == "hadamard" else None
            x = transform_act(x, smooth, signs, act.rotation if act.rotation_kind == "dense" else None)
            x = ste_reference(x, act.act_bits) if act.act_bits else x
        return F.linear(x, self.w, self.q.bias)


def float_reference(model):
    """A copy of `model` whose QuantLinears are FloatSTELinear (shares every other parameter)."""
    import copy
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantLinear):
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, FloatSTELinear(m))
    return ref


def lora_inputs(model, seed=3):
    kw = adapter_for(model).synthetic_inputs(model, 2, torch.Generator().manual_seed(seed))
    kw["hidden_states"] = kw["hidden_states"].clone().requires_grad_(True)
    return kw


def grads(model, kw, lora):
    """Output, d loss / d input and d loss / d (A, B) of a LoRA-like branch on x_embedder's output."""
    for p in lora:
        p.grad = None
    kw["hidden_states"].grad = None
    a, b = lora
    hook = model.x_embedder.register_forward_hook(lambda mod, args, out: out + (args[0] @ a) @ b)
    try:
        out = model(**kw).sample
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    finally:
        hook.remove()
    return out.detach(), kw["hidden_states"].grad.clone(), a.grad.clone(), b.grad.clone()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_per_token_rounding_is_straight_through_and_exact_in_value():
    x = torch.randn(3, 7, 40, requires_grad=True)
    y = quantize_per_token(x, 4)
    with torch.no_grad():
        assert torch.equal(y, quantize_per_token(x, 4))         # the STE term adds exactly nothing
    (y * torch.arange(40.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(40.0).expand(3, 7, 40))
    assert quantize_per_token(x.detach(), 4).grad_fn is None


def test_upstream_gradients_match_the_float_straight_through_reference(w4a8):
    torch.manual_seed(1)
    width = w4a8.x_embedder.in_features
    lora = [nn.Parameter(torch.randn(width, 2) * 0.3), nn.Parameter(torch.randn(2, w4a8.inner_dim) * 0.3)]
    kw = lora_inputs(w4a8)
    out, gx, ga, gb = grads(w4a8, kw, lora)
    rout, rgx, rga, rgb = grads(float_reference(w4a8), kw, lora)
    assert rel(out, rout) < 1e-5
    assert gx.abs().sum() > 0 and ga.abs().sum() > 0
    for g, r in ((gx, rgx), (ga, rga), (gb, rgb)):
        assert rel(g, r) < 1e-4, rel(g, r)
    # the same values as the inference path (the fused int8 codes): training sees the model that runs
    a, b = lora
    hook = w4a8.x_embedder.register_forward_hook(lambda mod, args, o: o + (args[0] @ a) @ b)
    with torch.no_grad():
        plain = w4a8(**{k: v.detach() if torch.is_tensor(v) else v for k, v in kw.items()}).sample
    hook.remove()
    assert rel(plain, out) < 1e-5


def test_a_trainable_transform_tensor_takes_the_differentiable_path(w4a8):
    layer = next(m for m in w4a8.modules() if isinstance(m, QuantLinear) and m.act is not None and m.act.has_smooth)
    smooth = layer.act.smooth
    try:
        layer.act.smooth = nn.Parameter(smooth.clone())       # a user training the smoothing divisor
        x = torch.randn(5, layer.in_features)
        layer(x).square().sum().backward()
        assert layer.act.smooth.grad is not None and layer.act.smooth.grad.abs().sum() > 0
    finally:
        del layer.act.smooth
        layer.act.register_buffer("smooth", smooth)


def test_w16a8_layer_passes_gradient_through():
    lin = TransformedLinear.wrap(nn.Linear(32, 8))
    lin.act.set_act_bits(8)
    x = torch.randn(4, 32, requires_grad=True)
    lin(x).sum().backward()
    assert torch.allclose(x.grad, lin.weight.sum(0).expand(4, 32))


def test_compile_with_gradients_traces_a_hadamard_layer_whole():
    """Width 48 = 12·4: the Hadamard takes the dense Paley base (quant/hadamard._base_matrix), which broke the
    graph at its torch.equal check on every traced call."""
    lin = TransformedLinear.wrap(nn.Linear(48, 8))
    lin.act.set_hadamard(torch.tensor([1, -1] * 24))
    lin.act.set_act_bits(8)
    x = torch.randn(4, 48, requires_grad=True)
    explain = torch._dynamo.explain(lin)(x)
    assert explain.graph_break_count == 0, [str(r.reason)[:300] for r in explain.break_reasons]
    compiled = torch.compile(lin, backend="eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert torch.equal(y, lin(x)) and x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.slow
def test_compile_with_gradients_has_no_graph_break(w4a8):
    kw = lora_inputs(w4a8)
    explain = torch._dynamo.explain(lambda **k: w4a8(**k).sample)(**kw)
    ours = [r for r in explain.break_reasons if any("dicompress" in str(f.filename) for f in r.user_stack)]
    assert not ours, [str(r.reason)[:300] for r in ours]
    assert explain.graph_break_count == 0, [str(r.reason)[:300] for r in explain.break_reasons]


def test_the_compile_mark_is_torchs_own():
    """compile_hints sets the attribute torch.compiler.assume_constant_result sets (without importing dynamo at
    dicompress's import): if a torch release changes the mark, this fails rather than graphs silently breaking."""
    from dicompress.compile_hints import MARK, assume_constant_result
    from dicompress.quant.hadamard import _base_matrix
    assert getattr(torch.compiler.assume_constant_result(lambda: 0), MARK) is True
    assert getattr(assume_constant_result(lambda: 0), MARK) is True and getattr(_base_matrix, MARK) is True
