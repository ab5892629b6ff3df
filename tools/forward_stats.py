"""What one forward of a quantized artifact does: quantized-linear calls, activation quantizations (sibling
linears reading one tensor share one, kernels/linear.py), and torch.compile graph breaks.

    python tools/forward_stats.py out/tiny_flux_w4a8          # after `dicompress run recipes/tiny_flux_w4a8.yaml`

CPU, fp32, one forward on random inputs (2 samples, 8x8 latent tokens, 4 text tokens); compile with the
aot_eager backend (tracing and graph breaks, no code generation). Prints JSON.
"""
from __future__ import annotations

import json
import sys

import torch

import dicompress
from dicompress.kernels import ops
from dicompress.nn.qlinear import QuantLinear


def inputs(config, batch: int = 2, side: int = 8, text: int = 4) -> dict:
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return {"hidden_states": torch.randn(batch, side * side, config.in_channels),
            "encoder_hidden_states": torch.randn(batch, text, config.joint_attention_dim),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim),
            "timestep": torch.full((batch,), 0.5), "img_ids": ids.view(-1, 3), "txt_ids": torch.zeros(text, 3),
            "return_dict": False}


def main(path: str) -> None:
    torch.manual_seed(0)
    model = dicompress.load(path).eval()
    kw = inputs(model.config)
    counts = {"quantized_linear_calls": 0, "activation_quantizations": 0}

    def count(key):
        def hook(*_):
            counts[key] += 1
        return hook

    hooks = [m.register_forward_pre_hook(count("quantized_linear_calls")) for m in model.modules()
             if isinstance(m, QuantLinear)]
    real = {n: getattr(ops, n) for n in ("quantize_act", "quantize_act_zp")}     # symmetric and zero-point grids
    for n, op in real.items():
        setattr(ops, n, lambda *a, op=op: count("activation_quantizations")() or op(*a))
    try:
        with torch.no_grad():
            eager = model(**kw)[0]
    finally:
        for n, op in real.items():
            setattr(ops, n, op)
        for h in hooks:
            h.remove()
    import torch._dynamo as dynamo
    dynamo.reset()
    dynamo.utils.counters.clear()
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager")(**kw)[0]
    breaks = dynamo.utils.counters["graph_break"]
    print(json.dumps({"artifact": path, **counts, "graph_breaks": sum(breaks.values()),
                      "graph_break_reasons": [r.splitlines()[0] for r in breaks],
                      "compiled_equals_eager": bool(torch.equal(compiled, eager)),
                      "command": "python " + " ".join(sys.argv)}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/tiny_flux_w4a8")
