"""`distill` pass: end-to-end recovery distillation of the current model against the uncompressed teacher
on the calibration model inputs (the teacher's own sampling trajectories), after pruning or quantization."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..distill import EndToEndConfig, distill_end_to_end
from ..distill.params import select_trainable
from ..errors import DistillError
from .base import Pass, register_pass

CURVE_POINTS = 50   # the report keeps this many (step, loss) points of the loss curve


class DistillPassConfig(EndToEndConfig):
    trainable: tuple[str, ...] | None = Field(
        None, description="fnmatch patterns of parameter names to train (e.g. '*.attn.*'); null = every "
                          "floating-point parameter of the blocks. Quantized linears have no float weight: only "
                          "their bias can train")
    loss: Literal["mse", "normalized_l2"] = Field("mse", description="loss between student and teacher predictions")
    feature_weight: float = Field(0.0, ge=0, description="weight of the feature loss (MSE between module outputs) "
                                                         "added to the prediction loss; 0 = none")
    features: tuple[tuple[str, str], ...] | None = Field(
        None, description="(student module, teacher module) pairs for the feature loss; null = the last block of "
                          "each block list in each model")


def loss_curve(losses: list[float], points: int = CURVE_POINTS) -> list[list]:
    """[[step, loss], ...] at most `points` evenly spaced steps (first and last included)."""
    if len(losses) <= points:
        return [[i, round(v, 6)] for i, v in enumerate(losses)]
    idx = sorted({round(i * (len(losses) - 1) / (points - 1)) for i in range(points)})
    return [[i, round(losses[i], 6)] for i in idx]


def default_features(adapter, student, teacher) -> list[tuple[str, str]]:
    """The last block of each block list, student vs teacher (indices differ once depth is pruned)."""
    pairs = []
    for attr, _ in adapter.block_lists:
        ns, nt = len(getattr(student, attr, ())), len(getattr(teacher, attr, ()))
        if ns and nt:
            pairs.append((f"{attr}.{ns - 1}", f"{attr}.{nt - 1}"))
    return pairs


@register_pass
class Distill(Pass):
    name = "distill"
    Config = DistillPassConfig
    needs_calibration = True
    needs_model_inputs = True   # the transformer's inputs at every call: no per-block inputs
    needs_teacher = True
    reads_block_data = False    # model-level inputs only: valid after the depth changed

    def apply(self, state) -> None:
        cfg = self.config
        inputs = self.calibration(state).model_inputs()
        patterns = cfg.trainable or tuple(f"{attr}.*" for attr, _ in state.adapter.block_lists)
        names = select_trainable(state.model, patterns)
        if not names:
            raise DistillError(f"distill: no floating-point parameter matches trainable {list(patterns)} (quantized "
                               "linears keep integer codes and cannot train)",
                               hint="widen `distill.trainable` (fnmatch over parameter names, e.g. '*norm*'), or "
                                    "move `distill` before the quantization passes")
        teacher = state.teacher
        pairs = list(cfg.features or default_features(state.adapter, state.model, teacher)) \
            if cfg.feature_weight else None
        params, stats = dict(state.model.named_parameters()), {}
        losses = distill_end_to_end(state.model, teacher, inputs, cfg, loss=cfg.loss,
                                    calibration_meta=self.calibration(state).meta, stats=stats,
                                    feature_weight=cfg.feature_weight, feature_pairs=pairs,
                                    key=state.checkpoint_key("end_to_end"), checkpoint_dir=state.work_dir,
                                    progress=state.progress, trainable=patterns)
        summary = {"steps": len(losses), "rows": int(inputs["hidden_states"].shape[0]),
                   "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                   "tensors_trained": len(names), "params_trained": sum(params[n].numel() for n in names), **stats}
        if pairs:
            summary["feature_pairs"] = [list(p) for p in pairs]
        state.add_pass_report(self.name, {**summary, "loss_curve": loss_curve(losses)})
