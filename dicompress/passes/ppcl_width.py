"""`ppcl_width` pass (PPCL width step): the FFNs of the selected blocks replaced by residual linear projectors.

Each selected FFN (FLUX double blocks: ff and ff_context; Qwen-Image blocks: img_mlp and txt_mlp) becomes
`ResidualProjector(dim)` = x + Linear(x) (prune/projector.py), initialised by least squares on the teacher's
FFN inputs and outputs (run on the calibration's captured block inputs), then distilled block by block: the
projectors of one block train on the teacher's captured input of that block against the teacher's output of
that block, with L1 between L2-normalised tokens per stream (PPCL's width loss). Every block trains on teacher
data only, so the projectors are independent: with `keep_teacher_ffns` the artifact keeps the FFNs they replaced
(`ppcl_width_ffns.safetensors`) and `dicompress.load(path, plug_ffns=[...])` unplugs any of them.

FLUX single blocks are refused: their MLP has no module of its own (proj_mlp's GELU output is concatenated with
the attention output and read by proj_out's columns), and the smoothing fold of proj_mlp's input group into the
block's norm would rescale a projector's residual input. Not done: PPCL's text-stream freeze across an interval.
"""
from __future__ import annotations

import time

import torch
from pydantic import Field
from safetensors.torch import save
from torch import nn

from ..calib.encoding import to_module
from ..distill import DistillConfig, distill_block
from ..errors import DistillError, RecipeError
from ..io.diffusers_plugin import _realign_cpu_tensors
from ..io.names import FFNS_NAME
from ..nn.surgery import set_module
from ..prune import teacher_io
from ..prune.projector import NormalEquations, ResidualProjector, ffn_spec, init_projector
from ..prune.width import LAYOUTS, select_blocks
from .base import Pass, PassConfig, register_pass

# passes that may run before: they leave plain nn.Linear FFNs and the captured block inputs valid
ALLOWED_BEFORE = ("depth_analysis", "distill")


class PPCLWidthConfig(PassConfig):
    include: tuple[str, ...] | None = Field(None, description="block names whose FFNs are replaced (fnmatch, full "
                                                              "names); null = every dual-stream block")
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
        for i, p in enumerate(previous):
            if not (getattr(p, "changes_structure", False) or p.name in ALLOWED_BEFORE):
                return [("", f"runs after passes[{i}].{p.name}, which rewrites linears; ppcl_width replaces plain "
                             "FFNs, so put it before quantization, smoothing, rotation and activation quantization")]
        return []

    def check_model(self, model, adapter) -> list[tuple[str, str]]:
        try:
            self.targets(model, adapter)
        except RecipeError as e:
            return [(e.key.rpartition(".")[2] if e.key else "include", str(e.args[0]))]
        return []

    def targets(self, model, adapter) -> list[tuple[object, list[tuple[str, bool, dict]]]]:
        """[(block ref, [(FFN path, is the text stream's, its spec)])], or a RecipeError naming what does not fit."""
        c = self.config
        dual = tuple(f"{attr}.*" for attr, stream in adapter.block_lists if stream == "double")
        include = c.include if c.include is not None else dual
        refs = select_blocks(adapter.blocks(model), include, c.keep)
        if not refs:
            raise RecipeError(f"no block matches include {list(include)} minus keep {list(c.keep)}",
                              key=f"{self.name}.include", hint="block names look like transformer_blocks.0")
        out = []
        for r in refs:
            layout = LAYOUTS.get((adapter.name, r.stream))
            if layout is None or any(f.after_heads for f in layout.ffns):
                raise RecipeError(f"{r.name} is a {adapter.name} {r.stream}-stream block, which has no separate FFN "
                                  "module (FLUX single blocks: proj_mlp's output is concatenated with the attention "
                                  "output and read by proj_out)", key=f"{self.name}.include",
                                  hint=f"select dual-stream blocks only, e.g. include: {list(dual)}")
            ffns = []
            for f in layout.ffns:
                if f.text and not c.text_stream:
                    continue
                path = f"{r.name}.{f.key}"
                module = model.get_submodule(path)
                if isinstance(module, ResidualProjector):
                    raise RecipeError(f"{path} is already a residual projector (an earlier ppcl_width)",
                                      key=f"{self.name}.include", hint="select other blocks, or add them to keep")
                try:
                    spec = ffn_spec(module)
                except ValueError as e:
                    raise RecipeError(f"{path}: {e}", key=f"{self.name}.include") from None
                ffns.append((path, f.text, spec))
            out.append((r, ffns))
        return out

    def apply(self, state) -> None:
        c, model, adapter = self.config, state.model, state.adapter
        targets = self.targets(model, adapter)
        store = self.calibration(state)
        names = [r.name for r in adapter.blocks(model)]
        if store.block_names and store.block_names != names:
            raise DistillError(f"{self.name}: the calibration store was captured on blocks {store.block_names[:3]}... "
                               f"but the model has {names[:3]}...",
                               hint="capture calibration on the model this pass changes (delete the cache entry)")
        every = _block_params(model, adapter)
        teacher, rows = {}, []
        for ref, ffns in targets:
            t = time.perf_counter()
            block = model.get_submodule(ref.name)
            eqs = _capture_ffn_io(block, adapter, store, ref.name, [(p[len(ref.name) + 1:], s) for p, _, s in ffns])
            for path, text, spec in ffns:
                old = model.get_submodule(path)
                if c.keep_teacher_ffns:
                    teacher.update({f"{path}.{k}": v.detach().cpu().contiguous() for k, v in old.state_dict().items()})
                eq = eqs[path[len(ref.name) + 1:]]
                w, b = eq.solve(c.ridge)
                p = next(old.parameters())
                proj = init_projector(ResidualProjector(spec["dim"], device=p.device, dtype=p.dtype), w, b)
                set_module(model, path, proj)
                rows.append({"module": path, "method": self.name, "stream": "text" if text else "image",
                             "dim": spec["dim"], "hidden": spec["hidden"],
                             "params_before": sum(q.numel() for q in old.parameters()),
                             "params_after": sum(q.numel() for q in proj.parameters()),
                             "fit_rel_error": round(eq.relative_error(w, b), 6)})
                state.record({"op": self.name, "module": path, **spec})
            steps = self._distill(state, store, names, ref, ffns)
            for r in rows[-len(ffns):]:
                r.update(steps, seconds=round(time.perf_counter() - t, 2))
                r["removed_fraction"] = round(1 - r["params_after"] / r["params_before"], 4)
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

    def _distill(self, state, store, names, ref, ffns) -> dict:
        """Train one block's projectors (and nothing else) on the teacher's input -> output of that block."""
        c = self.config
        if c.distill.steps == 0:
            return {}
        i = names.index(ref.name)
        inputs, targets = teacher_io(store, names, i, i)
        streams = tuple(dict.fromkeys("encoder_hidden_states" if text else "hidden_states" for _, text, _ in ffns))
        block = state.model.get_submodule(ref.name)
        losses = distill_block(block, state.adapter, inputs, targets, c.distill, loss="normalized_l1",
                               streams=streams, key=state.checkpoint_key(f"{self.name}:{ref.name}"),
                               checkpoint_dir=state.work_dir, progress=state.progress, desc=f"{self.name} {ref.name}",
                               trainable=[f"{p[len(ref.name) + 1:]}.proj.*" for p, _, _ in ffns])
        return {"steps": len(losses), "loss_first": round(losses[0], 6), "loss_last": round(losses[-1], 6)}


@torch.no_grad()
def _capture_ffn_io(block: nn.Module, adapter, store, name: str, ffns: list[tuple[str, dict]]) -> dict:
    """Run the teacher block on every captured input chunk; sum each FFN's least-squares normal equations."""
    eqs = {rel: NormalEquations(spec["dim"]) for rel, spec in ffns}
    hooks = [block.get_submodule(rel).register_forward_hook(lambda m, args, out, eq=eqs[rel]: eq.add(args[0], out))
             for rel, _ in ffns]
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
