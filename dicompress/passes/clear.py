"""`clear` pass (CLEAR, arXiv 2412.16112): the attention of the selected blocks becomes local: an image query sees the
text keys, the image keys within `radius` on the token grid ((dy^2 + dx^2) < r^2) and, with `pooling: f`, learned
f x f pooled keys / values; text queries see everything (clear/processor.py). Then only the attention parameters of
those blocks (q/k/v, qk-norms, output projections, pooling weights) are distilled on the teacher's trajectories
(clear/distill.py: flow matching + teacher prediction + attention outputs). The manifest op `clear_attention` sets
the processors at load; passes after it (quantization) see the CLEAR model and its recaptured calibration.

FLUX (double and single blocks) and Qwen-Image (its joint attention; padded text stays masked).
"""
from __future__ import annotations

import time

from pydantic import Field

from ..clear.distill import distill_clear
from ..clear.manifest_op import clear_entry
from ..clear.processor import clear_kind, ids_layout, install_clear, shapes_layout
from ..distill import DistillConfig
from ..distill.params import select_trainable
from ..errors import RecipeError
from ..prune.width import select_blocks
from .base import Pass, PassConfig, first_rewrite, recipe_problems, register_pass


class ClearConfig(PassConfig):
    radius: float = Field(..., gt=0, description="window radius on the image token grid: an image query sees image "
                                                 "keys with dy^2 + dx^2 < radius^2 (FLUX at 1024 px: a 64x64 grid; "
                                                 "the paper's r = 8, 16, 32); at most the calibration grid's side")
    pooling: int | None = Field(None, ge=2, description="also f x f average-pooled image keys / values with learned "
                                                        "weights (init 1/f^2) that every query sees; grids f does not "
                                                        "divide are padded (border cells rescaled to their real "
                                                        "tokens); null = none")
    include: tuple[str, ...] | None = Field(None, description="blocks whose attention becomes CLEAR (fnmatch over "
                                                              "block names); null = every double and single block")
    keep: tuple[str, ...] = Field((), description="blocks keeping full attention (fnmatch)")
    distill: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=200, lr=1e-4, batch_size=8),
                                   description="training of the CLEAR blocks' attention parameters on the teacher's "
                                               "trajectories; steps: 0 = the processors alone")
    flow_weight: float = Field(1.0, ge=0, description="weight of the flow-matching loss towards the teacher's sample")
    teacher_weight: float = Field(0.5, ge=0, description="weight of MSE(student prediction, teacher prediction)")
    attention_weight: float = Field(0.5, ge=0, description="weight of the attention-output MSE (mean over the CLEAR "
                                                           "modules)")


@register_pass
class Clear(Pass):
    name = "clear"
    Config = ClearConfig
    changes_structure = True
    reads_block_data = False    # model-level inputs only

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        training = self.config.distill.steps > 0
        # the grid (and radius check) comes from the captured model inputs, so those are read even untrained
        self.needs_calibration = self.needs_model_inputs = True
        self.needs_teacher = self.needs_sampling_loop = training

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        found = first_rewrite(previous)
        if found:
            i, p = found
            return [("", f"runs after passes[{i}].{p.name}, which rewrites linears; clear trains plain attention "
                         "linears, so put it before quantization, smoothing, rotation and activation quantization")]
        return []

    def check_model(self, model, adapter) -> list[tuple[str, str]]:
        return recipe_problems(self.targets, model, adapter)

    def targets(self, model, adapter) -> list[str]:
        """The attention modules that become CLEAR, or a RecipeError naming what does not fit."""
        c = self.config
        if adapter.name not in ("flux", "qwenimage"):
            raise RecipeError(f"the clear pass has attention processors for FLUX and Qwen-Image only; this model is "
                              f"{adapter.name} ({type(model).__name__}), whose attention it cannot replace",
                              key=f"{self.name}", hint="use a FluxTransformer2DModel or QwenImageTransformer2DModel")
        include = c.include if c.include is not None else tuple(f"{attr}.*" for attr, _ in adapter.block_lists)
        refs = select_blocks(adapter.blocks(model), include, c.keep)
        if not refs:
            raise RecipeError(f"no block matches include {list(include)} minus keep {list(c.keep)}",
                              key=f"{self.name}.include", hint="block names look like transformer_blocks.0")
        names = []
        for r in refs:
            attn = getattr(model.get_submodule(r.name), "attn", None)
            if attn is None or clear_kind(attn) != adapter.name:
                what = "no attn" if attn is None else \
                    f"{type(attn).__name__} with processor {type(getattr(attn, 'processor', None)).__name__}"
                raise RecipeError(f"{r.name} ({adapter.name}) has {what}: the clear pass replaces the model's stock "
                                  "attention processor only (FluxAttnProcessor, QwenDoubleStreamAttnProcessor2_0)",
                                  key=f"{self.name}.include", hint="leave this block out with `keep`")
            names.append(f"{r.name}.attn")
        return names

    @staticmethod
    def calibration_layout(inputs) -> tuple[int, tuple[int, int]]:
        """(text tokens, image token grid) of the captured calls: FLUX's txt_ids / img_ids, Qwen-Image's
        img_shapes (with the text length of encoder_hidden_states)."""
        try:
            if "img_shapes" in inputs and "encoder_hidden_states" in inputs:
                return shapes_layout(inputs["img_shapes"], inputs["encoder_hidden_states"].shape[1])
            if "img_ids" in inputs and "txt_ids" in inputs:
                return ids_layout(inputs["txt_ids"], inputs["img_ids"])
        except ValueError as e:
            raise RecipeError(f"the calibration's image tokens: {e}", key="clear") from e
        raise RecipeError("the calibration's model inputs hold neither img_ids / txt_ids (FLUX) nor img_shapes "
                          "(Qwen-Image): no image token grid", key="clear",
                          hint="capture calibration on a FLUX or Qwen-Image model")

    def grid_problems(self, grid: tuple[int, int], what: str) -> list[tuple[str, str, str]]:
        """[(key, message, hint)] of radius / pooling against an h x w token grid (`what` names the grid)."""
        c = self.config
        h, w = grid
        out = []
        if c.radius > max(h, w):
            out.append(("radius", f"radius {c.radius:g} is larger than {what} {h}x{w} image token grid (the window "
                                  "would hold the whole image)",
                        f"a radius up to {max(h, w)} here (FLUX at 1024 px: 64x64 tokens, r = 16)"))
        if c.pooling and c.pooling > min(h, w):
            out.append(("pooling", f"pooling factor {c.pooling} is larger than {what} {h}x{w} token grid",
                        f"a factor from 2 to {min(h, w)}"))
        return out

    def check_calibration(self, calibration) -> list[tuple[str, str]]:
        grid = expected_grid(calibration)
        return [] if grid is None else [(k, f"{msg}; {hint}") for k, msg, hint in
                                        self.grid_problems(grid, "the calibration's")]

    def check_grid(self, grid: tuple[int, int]) -> None:
        for key, msg, hint in self.grid_problems(grid, "the calibration's")[:1]:
            raise RecipeError(msg, key=f"{self.name}.{key}", hint=hint)

    def apply(self, state) -> None:
        c, model = self.config, state.model
        names = self.targets(model, state.adapter)
        store = self.calibration(state)
        inputs = store.model_inputs()
        n_text, grid = self.calibration_layout(inputs)
        self.check_grid(grid)
        install_clear(model, names, c.radius, c.pooling, grid)
        for n in names:
            state.record(clear_entry(n, model.get_submodule(n), c.radius, c.pooling, grid))
        patterns = [f"{n}.*" for n in names]
        trained = select_trainable(model, patterns)
        params = dict(model.named_parameters())
        summary = {"modules": len(names), "radius": c.radius, "pooling": c.pooling, "grid": list(grid),
                   "text_tokens": n_text, "image_keys_per_query": _window_size(grid, c.radius),
                   "params_trained": sum(params[n].numel() for n in trained), "tensors_trained": len(trained)}
        if c.distill.steps:
            t = time.perf_counter()
            losses = distill_clear(model, state.teacher, inputs, c.distill, attention=names, trainable=patterns,
                                   meta=store.meta, key=state.checkpoint_key(f"{self.name}:distill"),
                                   checkpoint_dir=state.work_dir, progress=state.progress,
                                   flow_weight=c.flow_weight, teacher_weight=c.teacher_weight,
                                   attention_weight=c.attention_weight, desc=self.name)
            summary.update(steps=len(losses), loss_first=round(losses[0], 6), loss_last=round(losses[-1], 6),
                           distill_seconds=round(time.perf_counter() - t, 2))
        state.add_pass_report(self.name, summary, [{"module": n, "radius": c.radius, "pooling": c.pooling}
                                                   for n in names])


def expected_grid(calibration) -> tuple[int, int] | None:
    """The image token grid a calibration set will capture at, from the recipe alone (None: unknown). The capture's
    pipelines run without a VAE, so diffusers uses 8 px per latent pixel, and FLUX / Qwen-Image pack 2x2 latent
    pixels per token: 16 px per token; the digits model samples at its fixed size; synthetic inputs are 8x8."""
    if calibration.source == "prompts":
        return calibration.height // 16, calibration.width // 16
    if calibration.source in ("classes", "embeddings"):
        from ..zoo.digits import SIZE        # the zoo model's latent side; 2x2 latent pixels per token
        return SIZE // 2, SIZE // 2
    if calibration.source == "synthetic":
        return 8, 8                          # ArchAdapter.synthetic_inputs' default grid
    return None


def _window_size(grid: tuple[int, int], radius: float) -> float:
    """Mean image keys per image query inside the circle (grid borders cut the window)."""
    from ..clear.window import clear_mask
    return round(float(clear_mask(0, grid, radius).float().sum(1).mean()), 2)
