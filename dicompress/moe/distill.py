"""Per-block Dense2MoE distillation on the shared engine: a block whose FFNs are MoE FFNs learns to map the
teacher's captured block inputs to the teacher's block outputs (per stream, the pass's loss) plus the Switch
load-balancing loss of every MoE FFN in it (weight `balance_weight`); only the MoE FFNs' parameters train
(experts and routers). Also the expert load a block's MoE FFNs see on calibration inputs."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..calib.encoding import to_module
from ..distill import DistillConfig, get_loss, train
from ..distill.layerwise import per_sample_keys
from ..distill.params import module_device_dtype, select_trainable, trainable_only
from .experts import MoEFFN


def moe_modules(block: nn.Module) -> dict[str, MoEFFN]:
    return {n: m for n, m in block.named_modules() if isinstance(m, MoEFFN)}


def distill_moe_block(block: nn.Module, adapter, inputs: dict, targets: dict[str, torch.Tensor], cfg: DistillConfig,
                      *, streams: tuple[str, ...], loss: str = "normalized_l2", balance_weight: float = 0.01,
                      key: str, checkpoint_dir: Path | None = None, progress: bool = True,
                      desc: str = "") -> tuple[list[float], list[float]]:
    """Train the MoE FFNs of `block`; returns (total loss per step, balance loss per step: mean over the MoEs)."""
    moes = moe_modules(block)
    if not moes:
        raise ValueError("the block has no MoE FFN to train")
    loss_t = get_loss(loss)
    keys = per_sample_keys(adapter, inputs)
    n = inputs["hidden_states"].shape[0]
    device, dtype = module_device_dtype(block)
    shared = {k: to_module(v, device, dtype, cast=False) for k, v in inputs.items() if k not in keys}
    balance: list[float] = []

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        batch = {**shared, **{k: to_module(inputs[k][idx], device, dtype) for k in keys}}
        out = adapter.run_block(block, batch)
        match = sum(loss_t(out[s], targets[s][idx].to(device)) for s in streams)
        aux = sum(m.aux_loss for m in moes.values()) / len(moes)
        balance.append(float(aux.detach()))
        return match + balance_weight * aux

    names = select_trainable(block, [f"{n}.*" for n in moes])
    with trainable_only(block, names):
        losses = train(block, loss_fn, n, cfg, key=key, checkpoint_dir=checkpoint_dir, progress=progress,
                       desc=desc or "dense2moe block")
    return losses, balance


@torch.no_grad()
def expert_load(block: nn.Module, adapter, chunks) -> dict[str, torch.Tensor]:
    """{MoE path relative to the block: assignment counts per routed expert [E]} over the calibration chunks."""
    moes = moe_modules(block)
    p = next(block.parameters())
    for m in moes.values():
        m.load.zero_()
        m.track_load = True
    try:
        for chunk in chunks:
            adapter.run_block(block, to_module(chunk, p.device, p.dtype))
    finally:
        for m in moes.values():
            m.track_load = False
    return {n: m.load.clone() for n, m in moes.items()}
