"""`mob`: Mixture of Blocks (Dense2MoE's last stage). A router per skippable block decides per sample and
timestep whether the block runs; a skipped block passes its hidden states through (moe/blocks.py: the router on
the block's temb, the gated execution). Trained with relaxed gates, a budget term toward `skip` and a group
feature loss against the teacher's captured features, then binarised so the calibration data skips `skip` of all
block executions, then (optionally) a per-group recovery of the blocks' weights (moe/mob_train.py) and an
end-to-end distillation against the teacher with the hard gates.

Works on FLUX transformers, with or without dense2moe before it (the router and the gating leave the blocks'
linears and their state-dict keys as they were: later passes, e.g. tlq, quantize them as usual).
"""
from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from ..distill import DistillConfig, EndToEndConfig
from ..errors import RecipeError
from ..moe.blocks import gate_block, initial_bias, is_gated
from ..moe.experts import MoEFFN
from ..moe.mob_op import mob_entry
from ..moe.mob_train import binarize, groups_of, recover_groups, train_routers
from ..prune.width import select_blocks
from ._recovery import block_store, check_teacher, end_to_end
from .base import Pass, PassConfig, first_rewrite, recipe_problems, register_pass


class MoBConfig(PassConfig):
    skip: float = Field(0.25, gt=0, lt=1, description="target fraction of all block executions skipped (blocks x "
                                                      "calibration rows), met on the calibration data (rows with the "
                                                      "same temb decide together: it may be a little exceeded)")
    group_size: int = Field(3, ge=1, description="consecutive blocks per group of the group feature loss (and of "
                                                 "the recovery); must divide the number of blocks")
    include: tuple[str, ...] | None = Field(None, description="blocks that may be skipped (fnmatch, full names); "
                                                              "null = every block except the first and the last")
    keep: tuple[str, ...] = Field((), description="blocks that always run (fnmatch)")
    distill: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=300, lr=1e-2, batch_size=32),
                                   description="router training: the whole chain of blocks with relaxed gates, only "
                                               "the routers train")
    budget_weight: float = Field(10.0, gt=0, description="weight of (mean skip probability - target rate)^2")
    temperature: float = Field(0.5, gt=0, description="Gumbel-sigmoid temperature of the relaxed gates")
    recovery: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=200, lr=1e-4, batch_size=32),
                                    description="after binarising, per group with the hard gates: the blocks' "
                                                "weights learn the teacher's group input -> output; steps 0 = none")
    loss: Literal["normalized_l2", "mse"] = Field("normalized_l2", description="group feature loss per stream")
    end_to_end: EndToEndConfig | None = Field(None, description="then end-to-end distillation of every block's "
                                              "weights with the hard gates (routers fixed) against the teacher's "
                                              "predictions: corrects what the per-group recovery leaves compounding "
                                              "across groups; null = none")


@register_pass
class MoB(Pass):
    name = "mob"
    Config = MoBConfig
    needs_calibration = True
    needs_block_inputs = True
    changes_structure = True

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.needs_teacher = self.config.end_to_end is not None

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        out = []
        if any(p.name == self.name for p in previous):
            out.append(("", "a second mob pass: the blocks are already gated"))
        found = first_rewrite(previous)
        if found:
            i, p = found
            out.append(("", f"runs after passes[{i}].{p.name}, which rewrites linears; mob trains the blocks' "
                            "weights (recovery), so put it before quantization, smoothing, rotation and "
                            "activation quantization"))
        return out

    def check_model(self, model, adapter) -> list[tuple[str, str]]:
        return recipe_problems(self.targets, model, adapter)

    def targets(self, model, adapter) -> tuple[list[str], list[int], list[tuple[int, int]]]:
        """(block names in order, indices of the skippable ones, groups), or a RecipeError naming what is wrong."""
        c = self.config
        if adapter.name != "flux":
            raise RecipeError(f"mob gates FLUX blocks (their forward takes temb per sample); this is a {adapter.name} "
                              "model", key=f"{self.name}.include")
        refs = adapter.blocks(model)
        names = [r.name for r in refs]
        gated = [n for n in names if is_gated(model.get_submodule(n))]
        if gated:
            raise RecipeError(f"{gated[0]} is already gated by an earlier mob", key=f"{self.name}.include",
                              hint="run mob once")
        include = c.include if c.include is not None else names[1:-1]
        chosen = {r.name for r in select_blocks(refs, include, c.keep)}
        skippable = [i for i, n in enumerate(names) if n in chosen]
        if not skippable:
            raise RecipeError(f"no skippable block: include {list(include)} minus keep {list(c.keep)} matches none of "
                              f"the {len(names)} blocks", key=f"{self.name}.include",
                              hint="block names look like transformer_blocks.1, single_transformer_blocks.3")
        if c.skip * len(names) > len(skippable):
            raise RecipeError(f"skipping {c.skip} of the executions of {len(names)} blocks needs more than the "
                              f"{len(skippable)} skippable blocks", key=f"{self.name}.skip",
                              hint=f"lower skip to at most {len(skippable) / len(names):.3f} or allow more blocks")
        try:
            groups = groups_of(len(names), c.group_size)
        except ValueError as e:
            raise RecipeError(str(e), key=f"{self.name}.group_size",
                              hint=f"a divisor of {len(names)}") from None
        return names, skippable, groups

    def apply(self, state) -> None:
        c, model, adapter = self.config, state.model, state.adapter
        names, skippable, groups = self.targets(model, adapter)
        store = block_store(self.name, state, self.calibration(state))
        check_teacher(self.name, state, c.end_to_end)
        t0 = time.perf_counter()
        rate = c.skip * len(names) / len(skippable)
        before = [_activated(model.get_submodule(n)) for n in names]
        total_before = sum(p.numel() for p in model.parameters()) - sum(
            sum(p.numel() for p in m.parameters()) - m.activated_params() for m in model.modules()
            if isinstance(m, MoEFFN))
        dim = store.block_inputs(names[0], keys=["temb"])["temb"].shape[-1]
        for i in skippable:
            block = model.get_submodule(names[i])
            p = next(block.parameters())
            gate_block(block, dim, device=p.device, dtype=p.dtype)
            with torch.no_grad():
                block.mob_router.bias.fill_(initial_bias(1 - rate))
        curves = train_routers(model, adapter, store, names, skippable, groups, c.distill, rate=rate,
                               budget_weight=c.budget_weight, tau=c.temperature, loss=c.loss,
                               key=state.checkpoint_key(f"{self.name}:routers"), checkpoint_dir=state.work_dir,
                               progress=state.progress) if c.distill.steps else {}
        model.zero_grad(set_to_none=True)
        bin_ = binarize(model, store, names, skippable, c.skip)
        t_routers = time.perf_counter() - t0
        rec = recover_groups(model, adapter, store, names, groups, c.recovery, skip_rate=bin_["skip_rate"],
                             loss=c.loss, key=state.checkpoint_key(f"{self.name}:recovery"),
                             checkpoint_dir=state.work_dir, progress=state.progress) if c.recovery.steps else []
        e2e = end_to_end(self.name, state, self.calibration(state), c.end_to_end)
        for i in skippable:
            state.record(mob_entry(names[i], model.get_submodule(names[i])))
        rates = [bin_["skip_rate"].get(n, 0.0) for n in names]
        routers = sum(p.numel() for i in skippable for p in model.get_submodule(names[i]).mob_router.parameters())
        executed = total_before + routers - sum(r * a for r, a in zip(rates, before))
        rows = [{"module": n, "method": self.name, "skippable": i in skippable, "skip_rate": r,
                 "activated_params": a} for i, (n, r, a) in enumerate(zip(names, rates, before))]
        summary = {"blocks": len(names), "skippable": len(skippable), "groups": len(groups), "skip_target": c.skip,
                   "skipped_block_fraction": round(bin_["skipped"] / (len(names) * bin_["rows"]), 4),
                   "calibration_rows": bin_["rows"], "threshold": round(bin_["threshold"], 5),
                   "activated_param_fraction": round(executed / total_before, 4),
                   "router_seconds": round(t_routers, 1), "seconds": round(time.perf_counter() - t0, 1)}
        if curves:
            n = max(1, len(curves["loss"]) // 10)
            summary["routers"] = {"steps": len(curves["loss"]),
                                  **{f"{k}_first": round(sum(v[:n]) / len(v[:n]), 5) for k, v in curves.items() if v},
                                  **{f"{k}_last": round(sum(v[-n:]) / len(v[-n:]), 5) for k, v in curves.items() if v}}
        if rec:
            summary["recovery"] = rec
        if e2e is not None:
            summary["end_to_end"] = e2e
        state.add_pass_report(self.name, summary, rows)


def _activated(block) -> int:
    """Parameters a sample running the block reads (MoE FFNs: their activated ones)."""
    idle = sum(sum(p.numel() for p in m.parameters()) - m.activated_params() for m in block.modules()
               if isinstance(m, MoEFFN))
    return sum(p.numel() for p in block.parameters()) - idle
