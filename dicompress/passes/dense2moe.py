"""`dense2moe` pass (Dense2MoE, arXiv 2510.09094, FFN step): the dense FFNs of the selected blocks become mixtures
of experts (moe/experts.py `MoEFFN`): a shared expert of the most important neurons (Taylor scores on the
teacher's captured block inputs) that every token runs, plus `experts` routed experts of equal width partitioned
from the rest (`partition`: importance order | co-activation clustering | random), of which each token runs
`top_k`; a router initialised by least squares to pick, per token, the experts whose neurons fire most
(moe/partition.py). Then each block's MoE FFNs are distilled on the teacher's input -> output of that block with a
Switch load-balancing loss (moe/distill.py), and optionally the whole model end to end (no balance term there).
The manifest op `moe_ffn` rebuilds the MoE FFNs at load time; quantization passes that follow quantize each
expert's linears (the routers stay in full precision).

FFNs converted: FLUX ff / ff_context and single blocks' MLPs (moe/single.py: proj_mlp becomes the MoE FFN, whose
down-projections are proj_out's MLP columns; proj_out keeps its attention columns), Qwen-Image img_mlp / txt_mlp.
A single block's MLP reads text and image tokens alike, so `text_stream: false` does not exclude it.
"""
from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..distill import DistillConfig, EndToEndConfig
from ..errors import RecipeError
from ..moe import (MoEFFN, dense_parts, expert_mass, fit_router, moe_from_dense, partition_cluster,
                   partition_importance, partition_random, router_recall, split_widths, topk_coverage)
from ..moe.calibrate import ffn_statistics
from ..moe.distill import distill_moe_block, expert_load
from ..moe.manifest_op import moe_entry
from ..moe.single import MLP, install_single_moe, single_mlp_parts
from ..nn.surgery import set_module
from ..prune import teacher_io
from ..prune.width import LAYOUTS, select_blocks
from ._recovery import block_store, check_teacher, end_to_end
from .base import Pass, PassConfig, first_rewrite, recipe_problems, register_pass


class Dense2MoEConfig(PassConfig):
    experts: int = Field(7, ge=1, description="routed experts per FFN (equal widths)")
    top_k: int = Field(2, ge=1, description="routed experts each token runs (gates: k x softmax over the k "
                                            "selected router logits, so equal gates are 1)")
    shared_fraction: float = Field(0.125, ge=0, lt=1, description="share of each FFN's neurons in the shared "
                                   "expert (rounded; neurons left over by the routed split join it)")
    shared_width: int | None = Field(None, ge=0, description="shared expert width in neurons (overrides "
                                                             "shared_fraction); must be below the FFN's width")
    partition: Literal["importance", "cluster", "random"] = Field(
        "importance", description="routed neurons: importance (contiguous chunks in Taylor-score order) | cluster "
                                  "(balanced k-means on co-activation profiles) | random (seeded)")
    include: tuple[str, ...] | None = Field(None, description="block names whose FFNs are converted (fnmatch, full "
                                                              "names); null = every block (FLUX: double and single)")
    keep: tuple[str, ...] = Field((), description="block names whose FFNs stay dense (fnmatch)")
    text_stream: bool = Field(True, description="also convert the text stream's FFN (ff_context / txt_mlp)")
    taylor_probes: int = Field(2, ge=1, description="random output directions per calibration chunk (Taylor)")
    router_tokens: int = Field(4096, ge=16, description="FFN input tokens sampled per FFN for the co-activation "
                                                        "profiles and the router's least-squares fit")
    ridge: float = Field(1e-3, ge=0, description="router fit ridge, relative to the inputs' mean Gram diagonal")
    distill: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=200, lr=1e-4, batch_size=16),
                                   description="per block: the MoE FFNs trained on the teacher's block input -> "
                                               "output; steps: 0 = the split and router fit only")
    loss: Literal["normalized_l2", "mse"] = Field("normalized_l2", description="per-block output loss per stream")
    balance_weight: float = Field(0.01, ge=0, description="weight of the Switch load-balancing loss "
                                                          "E * sum f_i P_i in the per-block distillation")
    end_to_end: EndToEndConfig | None = Field(None, description="then end-to-end distillation of the blocks against "
                                              "the teacher's predictions (no balance term); null = none")
    seed: int = Field(0, ge=0, description="Taylor probe directions, token sampling, random partition")

    @model_validator(mode="after")
    def _k_within_experts(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) is larger than the number of routed experts ({self.experts})")
        return self


@register_pass
class Dense2MoE(Pass):
    name = "dense2moe"
    Config = Dense2MoEConfig
    needs_calibration = True
    needs_block_inputs = True
    changes_structure = True

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.needs_teacher = self.config.end_to_end is not None

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        found = first_rewrite(previous)
        if found:
            i, p = found
            return [("", f"runs after passes[{i}].{p.name}, which rewrites linears; dense2moe splits plain "
                         "FFNs, so put it before quantization, smoothing, rotation and activation quantization")]
        return []

    def check_model(self, model, adapter) -> list[tuple[str, str]]:
        return recipe_problems(self.targets, model, adapter)

    def targets(self, model, adapter) -> list[tuple[object, list[tuple[str, bool, int]]]]:
        """[(block ref, [(FFN path, text stream?, hidden width)])], or a RecipeError naming what does not fit."""
        c = self.config
        every = tuple(f"{attr}.*" for attr, _ in adapter.block_lists)
        include = c.include if c.include is not None else every
        refs = select_blocks(adapter.blocks(model), include, c.keep)
        if not refs:
            raise RecipeError(f"no block matches include {list(include)} minus keep {list(c.keep)}: no FFN selected",
                              key=f"{self.name}.include", hint="block names look like transformer_blocks.0")
        out = []
        for r in refs:
            layout = LAYOUTS.get((adapter.name, r.stream))
            if layout is None:
                raise RecipeError(f"{r.name} is a {adapter.name} {r.stream}-stream block, whose FFN layout dense2moe "
                                  "does not know", key=f"{self.name}.include",
                                  hint=f"select other blocks (include: {list(every)})")
            ffns = []
            for f in layout.ffns:
                if f.text and not c.text_stream:
                    continue
                path = f"{r.name}.{MLP if f.after_heads else f.key}"
                try:
                    block = model.get_submodule(r.name)
                    parts = single_mlp_parts(block) if f.after_heads else dense_parts(model.get_submodule(path))
                    hidden = parts["w1"].shape[0]
                    split_widths(hidden, c.experts, c.shared_fraction, c.shared_width)
                except ValueError as e:
                    key = "shared_width" if str(e).startswith("a shared expert") else "experts"
                    raise RecipeError(f"{path}: {e}", key=f"{self.name}.{key}") from None
                ffns.append((path, f.text, hidden))
            out.append((r, ffns))
        return out

    def apply(self, state) -> None:
        c, model, adapter = self.config, state.model, state.adapter
        targets = self.targets(model, adapter)
        store = block_store(self.name, state, self.calibration(state))
        names = [r.name for r in adapter.blocks(model)]
        check_teacher(self.name, state, c.end_to_end)
        total_before = sum(p.numel() for p in model.parameters())
        ffn_before = _all_ffn_params(model, adapter)
        rows = []
        for ref, ffns in targets:
            t = time.perf_counter()
            block = model.get_submodule(ref.name)
            rels = [p[len(ref.name) + 1:] for p, _, _ in ffns]
            stats = ffn_statistics(block, adapter, store.iter_block_inputs(ref.name), rels, probes=c.taylor_probes,
                                   tokens=c.router_tokens, seed=c.seed + names.index(ref.name))
            block_rows = [self._convert(state, path, text, hidden, stats[rel])
                          for (path, text, hidden), rel in zip(ffns, rels)]
            block_rows[0].update(self._distill(state, store, names, ref, ffns))
            load = expert_load(block, adapter, store.iter_block_inputs(ref.name))
            for r, rel in zip(block_rows, rels):
                counts = load["proj_mlp" if rel == MLP else rel].double()
                r["load"] = [round(float(x), 4) for x in counts / counts.sum().clamp_min(1)]
                r["load_max_over_mean"] = round(float(counts.max() / counts.mean().clamp_min(1e-12)), 3)
                r["seconds"] = round(time.perf_counter() - t, 2)
            rows += block_rows
        from ..io.diffusers_plugin import _realign_cpu_tensors   # lazy: diffusers' quantizers take seconds to import
        _realign_cpu_tensors(model)
        e2e = self._end_to_end(state)
        moes = [m for m in model.modules() if isinstance(m, MoEFFN)]
        for m in moes:
            m.aux_loss = None          # the last training step's graph
        idle = sum(sum(p.numel() for p in m.parameters()) - m.activated_params() for m in moes)
        conv_dense = sum(r["params_dense"] for r in rows)
        conv_active = sum(r["params_activated"] for r in rows)
        summary = {"ffns_converted": len(rows), "blocks": len(targets), "partition": c.partition,
                   "experts": c.experts, "top_k": c.top_k,
                   "activated_ffn_param_fraction": round(conv_active / conv_dense, 4),
                   "activated_ffn_param_fraction_model": round((ffn_before - conv_dense + conv_active) / ffn_before,
                                                               4),
                   "activated_param_fraction": round((sum(p.numel() for p in model.parameters()) - idle)
                                                     / total_before, 4),
                   "oracle_topk_coverage": _mean(rows, "oracle_topk_coverage"),
                   "router_topk_coverage": _mean(rows, "router_topk_coverage"),
                   "router_recall": _mean(rows, "router_recall"),
                   "load_max_over_mean": max(r["load_max_over_mean"] for r in rows)}
        steps = [r for r in rows if "loss_first" in r]
        if steps:
            summary["distill_loss"] = {"first": _mean(steps, "loss_first"), "last": _mean(steps, "loss_last"),
                                       "balance_last": _mean(steps, "balance_last")}
        if e2e is not None:
            summary["end_to_end"] = e2e
        state.add_pass_report(self.name, summary, rows)

    def _convert(self, state, path: str, text: bool, hidden: int, stats: dict) -> dict:
        """Split one FFN, fit its router, put the MoE FFN in place, record the manifest entry; the report row."""
        c = self.config
        block_name, _, rel = path.rpartition(".")
        single = rel == MLP
        old = state.model.get_submodule(block_name if single else path)
        d = single_mlp_parts(old) if single else dense_parts(old)
        shared_w, width = split_widths(hidden, c.experts, c.shared_fraction, c.shared_width)
        x = stats["inputs"]
        with torch.no_grad():
            w1, b1 = d["w1"].detach().float().cpu(), d["b1"].detach().float().cpu() if d["b1"] is not None else None
            act = F.gelu(F.linear(x, w1, b1), approximate=d["approximate"])
        if c.partition == "importance":
            shared, experts = partition_importance(stats["scores"], shared_w, c.experts, width)
        elif c.partition == "cluster":
            shared, experts = partition_cluster(act, stats["scores"], shared_w, c.experts, width)
        else:
            shared, experts = partition_random(hidden, shared_w, c.experts, width, seed=c.seed)
        mass = expert_mass(act, d["w2"].detach().float().cpu().norm(dim=0), experts)
        rw, rb = fit_router(x, mass, c.ridge)
        logits = x @ rw.T + rb
        p = d["w1"]
        moe = moe_from_dense(d, shared, experts, c.top_k, (rw.to(p.device, p.dtype), rb.to(p.device, p.dtype)))
        dense_params = sum(q.numel() for q in (d["w1"], d["b1"], d["w2"], d["b2"]) if q is not None)
        if single:
            install_single_moe(old, moe)
            state.record(moe_entry(block_name, moe, hidden, ffn=MLP))
        else:
            set_module(state.model, path, moe)
            state.record(moe_entry(path, moe, hidden))
        return {"module": path, "method": self.name, "stream": "text" if text else "image", "hidden": hidden,
                "shared": shared_w, "experts": f"{c.experts}x{width}", "top_k": c.top_k,
                "params_dense": dense_params, "params_activated": moe.activated_params(),
                "activated_fraction": round(moe.activated_params() / dense_params, 4),
                "oracle_topk_coverage": round(topk_coverage(mass, c.top_k), 4),
                "router_topk_coverage": round(topk_coverage(mass, c.top_k, logits.topk(c.top_k, 1).indices), 4),
                "router_recall": round(router_recall(logits, mass, c.top_k), 4), "tokens": int(x.shape[0])}

    def _distill(self, state, store, names, ref, ffns) -> dict:
        c = self.config
        if c.distill.steps == 0:
            return {}
        i = names.index(ref.name)
        inputs, targets = teacher_io(store, names, i, i)
        # a single block's MLP writes text and image tokens alike: both of its outputs
        streams = tuple(dict.fromkeys(s for path, text, _ in ffns for s in (
            ("hidden_states", "encoder_hidden_states") if path.endswith(f".{MLP}")
            else ("encoder_hidden_states" if text else "hidden_states",))))
        losses, balance = distill_moe_block(
            state.model.get_submodule(ref.name), state.adapter, inputs, targets, c.distill, streams=streams,
            loss=c.loss, balance_weight=c.balance_weight, key=state.checkpoint_key(f"{self.name}:{ref.name}"),
            checkpoint_dir=state.work_dir, progress=state.progress, desc=f"{self.name} {ref.name}")
        return {"steps": len(losses), "loss_first": round(losses[0], 6), "loss_last": round(losses[-1], 6),
                "balance_last": round(balance[-1], 4) if balance else None}

    def _end_to_end(self, state) -> dict | None:
        return end_to_end(self.name, state, self.calibration(state), self.config.end_to_end)


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def _all_ffn_params(model, adapter) -> int:
    """Parameters of every FFN of the model (FLUX single blocks: proj_mlp, proj_out's MLP columns and its bias)."""
    total = 0
    for r in adapter.blocks(model):
        block = model.get_submodule(r.name)
        for f in LAYOUTS[(adapter.name, r.stream)].ffns:
            ffn = block.proj_mlp if f.after_heads else block.get_submodule(f.key)
            if f.after_heads and isinstance(ffn, MoEFFN):      # a converted single-block MLP
                total += ffn.activated_params()
                continue
            ffn = None if f.after_heads else ffn
            if ffn is not None and type(ffn).__name__ != "FeedForward":    # already replaced: what a token reads
                total += ffn.activated_params() if isinstance(ffn, MoEFFN) else sum(p.numel() for p in ffn.parameters())
                continue
            up, down = block.get_submodule(f.up), block.get_submodule(f.down)
            total += sum(p.numel() for p in up.parameters()) + up.out_features * down.out_features
            if down.bias is not None:       # a single block's proj_out bias counts as the MLP's (MoEFFN takes it)
                total += down.bias.numel()
    return total
