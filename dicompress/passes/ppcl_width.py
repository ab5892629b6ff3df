"""`ppcl_width` pass (PPCL width step): the FFNs of the selected blocks replaced by residual linear projectors.

Each selected FFN (FLUX double blocks: ff and ff_context; FLUX single blocks: the MLP; Qwen-Image blocks:
img_mlp and txt_mlp) becomes x + Linear(x) (prune/projector.py), initialised by least squares on the teacher's
FFN inputs and outputs (run on the calibration's captured block inputs), then distilled block by block: the
projectors of one block train on the teacher's captured input of that block against the teacher's output of
that block, with L1 between L2-normalised tokens per stream (PPCL's width loss). Every block trains on teacher
data only, so the projectors are independent: with `keep_teacher_ffns` the artifact keeps the FFNs they replaced
(`ppcl_width_ffns.safetensors`) and `dicompress.load(path, plug_ffns=[...])` unplugs any of them.

Dual-stream FFNs become a `ResidualProjector` module. A FLUX single block's MLP has no module of its own
(proj_out reads [attention | GELU(proj_mlp(x))]): its projector is folded into the block's linears
(`fold_single_projector`: proj_mlp the identity, proj_out's MLP columns I + W). Not done: PPCL's text-stream
freeze across an interval.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from pydantic import Field
from safetensors.torch import save
from torch import nn

from ..calib.encoding import to_module
from ..distill import DistillConfig, distill_block
from ..errors import RecipeError
from ..io.names import FFNS_NAME
from ..nn.surgery import set_module
from ..prune import teacher_io
from ..prune.projector import (NormalEquations, ResidualProjector, ffn_spec, fold_single_projector, init_projector,
                               single_mlp_spec)
from ..prune.width import LAYOUTS, select_blocks
from ._recovery import block_store
from .base import Pass, PassConfig, first_rewrite, register_pass


class PPCLWidthConfig(PassConfig):
    include: tuple[str, ...] | None = Field(None, description="block names whose FFNs are replaced (fnmatch, full "
                                                              "names); null = every block")
    keep: tuple[str, ...] = Field((), description="block names whose FFNs stay (fnmatch)")
    text_stream: bool = Field(True, description="also replace the text stream's FFN (ff_context / txt_mlp)")
    distill: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=200, lr=1e-4, batch_size=16),
                                   description="per block: the projectors trained on the teacher's input of the "
                                               "block -> the teacher's output of the block (L1 between "
                                               "L2-normalised tokens, per stream); steps: 0 = least squares only")
    ridge: float = Field(1e-6, ge=0, description="least-squares ridge, relative to the mean diagonal of the inputs' "
                                                 "Gram matrix (with the ones column)")
    keep_teacher_ffns: bool = Field(True, description=f"store the replaced FFNs in {FFNS_NAME} so that each "
                                                      "projector can be unplugged at load time")


@register_pass
class PPCLWidth(Pass):
    name = "ppcl_width"
    Config = PPCLWidthConfig
    needs_calibration = True
    needs_block_inputs = True
    changes_structure = True

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        found = first_rewrite(previous)
        if found:
            i, p = found
            return [("", f"runs after passes[{i}].{p.name}, which rewrites linears; ppcl_width replaces plain "
                         "FFNs, so put it before quantization, smoothing, rotation and activation quantization")]
        return []

    def check_model(self, model, adapter) -> list[tuple[str, str]]:
        try:
            self.targets(model, adapter)
        except RecipeError as e:
            return [(e.key.rpartition(".")[2] if e.key else "include", str(e.args[0]))]
        return []

    def targets(self, model, adapter) -> list[tuple[object, list["Target"]]]:
        """[(block ref, its Targets)], or a RecipeError naming what does not fit."""
        c = self.config
        include = c.include if c.include is not None else tuple(f"{attr}.*" for attr, _ in adapter.block_lists)
        refs = select_blocks(adapter.blocks(model), include, c.keep)
        if not refs:
            raise RecipeError(f"no block matches include {list(include)} minus keep {list(c.keep)}",
                              key=f"{self.name}.include", hint="block names look like transformer_blocks.0")
        out = []
        for r in refs:
            layout = LAYOUTS.get((adapter.name, r.stream))
            if layout is None:
                raise RecipeError(f"{r.name}: ppcl_width knows no FFN layout for {adapter.name} {r.stream}-stream "
                                  "blocks", key=f"{self.name}.include")
            block, found = model.get_submodule(r.name), []
            for f in layout.ffns:
                if f.text and not c.text_stream:
                    continue
                name = f"{r.name}.{f.key}"
                try:
                    if f.after_heads:    # FLUX single block: the MLP lives in proj_mlp, act_mlp and proj_out
                        found.append(Target(name, r.name, f.key, False, single_mlp_spec(block), single=True))
                        continue
                    module = block.get_submodule(f.key)
                    if isinstance(module, ResidualProjector):
                        raise ValueError("already a residual projector (an earlier ppcl_width)")
                    found.append(Target(name, name, f.key, f.text, ffn_spec(module)))
                except ValueError as e:
                    raise RecipeError(f"{name}: {e}", key=f"{self.name}.include",
                                      hint="select other blocks, or add them to keep") from None
            out.append((r, found))
        return out

    def apply(self, state) -> None:
        c, model, adapter = self.config, state.model, state.adapter
        targets = self.targets(model, adapter)
        store = block_store(self.name, state, self.calibration(state))
        names = [r.name for r in adapter.blocks(model)]
        every = _block_params(model, adapter)
        teacher, rows = {}, []
        for ref, found in targets:
            t = time.perf_counter()
            block = model.get_submodule(ref.name)
            eqs = _capture_ffn_io(block, adapter, store, ref.name, found)
            for tg in found:
                before = _params(block, tg)
                if c.keep_teacher_ffns:
                    teacher.update(_teacher_state(block, tg))
                w, b = eqs[tg.name].solve(c.ridge)
                if tg.single:
                    fold_single_projector(block, w, b)
                else:
                    p = next(block.get_submodule(tg.rel).parameters())
                    set_module(block, tg.rel, init_projector(ResidualProjector(tg.spec["dim"], device=p.device,
                                                                               dtype=p.dtype), w, b))
                rows.append({"module": tg.name, "method": self.name, "stream": tg.stream,
                             "dim": tg.spec["dim"], "hidden": tg.spec["hidden"], "params_before": before,
                             "params_after": _params(block, tg),
                             "fit_rel_error": round(eqs[tg.name].relative_error(w, b), 6)})
                state.record({"op": self.name, "module": tg.module, **({"ffn": tg.rel} if tg.single else {}),
                              **tg.spec})
            steps = self._distill(state, store, names, ref, found)
            for r in rows[-len(found):]:
                r.update(steps, seconds=round(time.perf_counter() - t, 2))
                r["removed_fraction"] = round(1 - r["params_after"] / r["params_before"], 4)
        from ..io.diffusers_plugin import _realign_cpu_tensors   # lazy: diffusers' quantizers take seconds to import
        _realign_cpu_tensors(model)
        if c.keep_teacher_ffns:
            state.files[FFNS_NAME] = save(teacher)
        after = _block_params(model, adapter)
        summary = {"ffns_replaced": len(rows), "blocks": len(targets), "removed_params": every - after,
                   "block_param_fraction": round(after / every, 4), "removed_fraction": round(1 - after / every, 4),
                   "fit_rel_error_mean": round(sum(r["fit_rel_error"] for r in rows) / len(rows), 6)}
        if c.distill.steps:
            summary["distill_loss"] = {"first": round(sum(r["loss_first"] for r in rows) / len(rows), 6),
                                       "last": round(sum(r["loss_last"] for r in rows) / len(rows), 6)}
        state.add_pass_report(self.name, summary, rows)

    def _distill(self, state, store, names, ref, found: list["Target"]) -> dict:
        """Train one block's projectors (and nothing else) on the teacher's input -> output of that block."""
        c = self.config
        if c.distill.steps == 0:
            return {}
        i = names.index(ref.name)
        inputs, targets = teacher_io(store, names, i, i)
        streams = tuple(dict.fromkeys(s for tg in found for s in tg.streams))
        block = state.model.get_submodule(ref.name)
        trainable, hooks = [], []
        for tg in found:
            if tg.single:   # the projector is proj_out's MLP columns (and the bias): the attention columns stay
                trainable += ["proj_out.weight", "proj_out.bias"]
                weight = block.proj_out.weight
                mask = torch.ones_like(weight)
                mask[:, :tg.spec["inner"]] = 0
                flag = weight.requires_grad          # a hook needs requires_grad; trainable_only sets it anyway
                hooks.append(weight.requires_grad_(True).register_hook(lambda g, m=mask: g * m))
                weight.requires_grad_(flag)
            else:
                trainable.append(f"{tg.rel}.proj.*")
        try:
            losses = distill_block(block, state.adapter, inputs, targets, c.distill, loss="normalized_l1",
                                   streams=streams, key=state.checkpoint_key(f"{self.name}:{ref.name}"),
                                   checkpoint_dir=state.work_dir, progress=state.progress,
                                   desc=f"{self.name} {ref.name}", trainable=trainable)
        finally:
            for h in hooks:
                h.remove()
        return {"steps": len(losses), "loss_first": round(losses[0], 6), "loss_last": round(losses[-1], 6)}


@dataclass(frozen=True)
class Target:
    """One FFN to replace. `name`: how reports and `plug_ffns` call it (block.ff, block.mlp ...); `module`: the
    manifest entry's module (the FFN; for a FLUX single block, the block); `rel`: the FFN key within the block."""
    name: str
    module: str
    rel: str
    text: bool
    spec: dict
    single: bool = False

    @property
    def stream(self) -> str:
        return "joint" if self.single else "text" if self.text else "image"

    @property
    def streams(self) -> tuple[str, ...]:
        """The block outputs this FFN changes (a single block's MLP sees the text and image tokens)."""
        if self.single:
            return ("hidden_states", "encoder_hidden_states")
        return ("encoder_hidden_states",) if self.text else ("hidden_states",)


def _ffn_modules(block: nn.Module, tg: Target) -> dict[str, nn.Module]:
    if tg.single:
        return {"proj_mlp": block.proj_mlp, "proj_out": block.proj_out}
    return {tg.rel: block.get_submodule(tg.rel)}


def _params(block: nn.Module, tg: Target) -> int:
    """The FFN's parameters (a single block: proj_mlp and proj_out's MLP columns)."""
    if tg.single:
        return sum(p.numel() for p in block.proj_mlp.parameters()) + block.proj_out.out_features * block.mlp_hidden_dim
    return sum(p.numel() for p in block.get_submodule(tg.rel).parameters())


def _teacher_state(block: nn.Module, tg: Target) -> dict:
    """What unplugging needs, keyed `<module>.<rel>.<param>`: the FFN's state (single block: proj_mlp, proj_out)."""
    base = tg.module if tg.single else tg.module.rpartition(".")[0]
    return {f"{base}.{name}.{k}": v.detach().cpu().contiguous()
            for name, m in _ffn_modules(block, tg).items() for k, v in m.state_dict().items()}


@torch.no_grad()
def _capture_ffn_io(block: nn.Module, adapter, store, name: str, found: list[Target]) -> dict:
    """Run the teacher block on every captured input chunk; sum each FFN's least-squares normal equations (a
    single block's MLP output is proj_out's MLP columns times GELU(proj_mlp(x)), without proj_out's bias)."""
    eqs = {tg.name: NormalEquations(tg.spec["dim"]) for tg in found}
    hooks = []
    for tg in found:
        eq = eqs[tg.name]
        if tg.single:
            seen = {}
            w_mlp = block.proj_out.weight[:, tg.spec["inner"]:]
            hooks.append(block.proj_mlp.register_forward_hook(lambda m, args, out, s=seen: s.update(x=args[0])))
            hooks.append(block.act_mlp.register_forward_hook(
                lambda m, args, out, s=seen, eq=eq, w=w_mlp: eq.add(s["x"], out @ w.T)))
        else:
            hooks.append(block.get_submodule(tg.rel).register_forward_hook(
                lambda m, args, out, eq=eq: eq.add(args[0], out)))
    p = next(block.parameters())
    try:
        for chunk in store.iter_block_inputs(name):
            adapter.run_block(block, to_module(chunk, p.device, p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return eqs


def _block_params(model: nn.Module, adapter) -> int:
    return sum(p.numel() for attr, _ in adapter.block_lists for p in getattr(model, attr).parameters())
