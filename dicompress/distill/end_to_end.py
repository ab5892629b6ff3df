"""End-to-end distillation: the student's velocity prediction is matched to the teacher's on the captured
model inputs (the latents along the teacher's own sampling trajectory at every captured timestep, with
their conditioning), optionally plus feature losses between named modules of the two models."""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..arch import adapter_for_class
from ..calib.encoding import shared_input_names, split_model_input, to_module
from ..calib.store import ModelInputs
from ..errors import DistillError
from .config import DistillConfig
from .engine import checkpoint_path, train
from .losses import get_loss
from .trajectories import GrowingRows
from .params import module_device_dtype, select_trainable, trainable_only


def per_sample_names(model_inputs: dict, model: nn.Module) -> frozenset[str]:
    """Which kwargs hold one row per sample: as the store recorded them (`ModelInputs.per_sample`), else (a
    plain dict of forward kwargs) by the store's rule: a first dim of `hidden_states`' batch, minus the names
    the model's adapter declares shared (FLUX's img_ids / txt_ids)."""
    known = getattr(model_inputs, "per_sample", None)
    if known is not None:
        return frozenset(known)
    n = model_inputs["hidden_states"].shape[0]
    shared = shared_input_names(adapter_for_class(type(model).__name__))
    return frozenset(k for k, v in model_inputs.items()
                     if (not torch.is_tensor(v) or v.ndim) and split_model_input(k, v, n, shared) == "per_sample")


def rows(model_inputs: dict, per: frozenset[str], idx: torch.Tensor, device, dtype) -> dict:
    """Model kwargs of rows `idx` on the model's device; per-sample floats in its dtype."""
    out = {}
    for k, v in model_inputs.items():
        if k not in per:
            out[k] = to_module(v, device, dtype, cast=False)
        elif torch.is_tensor(v):
            out[k] = to_module(v[idx], device, dtype)
        else:
            out[k] = [v[i] for i in idx.tolist()]
    return out


def _tensors(out) -> list[torch.Tensor]:
    """A module's output as a flat list of tensors (blocks return tuples, models return output objects)."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "to_tuple"):
        return _tensors(out.to_tuple())
    return []


@contextlib.contextmanager
def recording(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While active, `store[name]` holds the latest output tensors of each named submodule."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = []
    try:
        for name in names:
            def hook(mod, args, out, name=name):
                store[name] = _tensors(out)
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def prediction(model: nn.Module, kwargs: dict) -> torch.Tensor:
    return model(**kwargs, return_dict=False)[0]


def distill_end_to_end(student: nn.Module, teacher: nn.Module, model_inputs: dict, cfg: DistillConfig, *,
                       loss: str = "mse", feature_weight: float = 0.0,
                       feature_pairs: list[tuple[str, str]] | None = None, key: str,
                       checkpoint_dir: Path | None = None, progress: bool = True,
                       trainable: Sequence[str] | None = None, feature_loss: str = "mse",
                       desc: str = "distill", calibration_meta: dict | None = None,
                       stats: dict | None = None) -> list[float]:
    """Train `student` so that its prediction matches the (frozen) teacher's on the rows of `model_inputs`
    (e.g. `CalibrationStore.model_inputs()`), plus `feature_weight` x the `feature_loss` between the outputs
    of each (student module, teacher module) name pair. `trainable`: fnmatch patterns of the student's
    parameter names (default: every float parameter).

    With `cfg.student_trajectories` (an EndToEndConfig) > 0, the student's own trajectories are captured during
    training (trajectories.py) by the sampling loop `calibration_meta` (the store's meta) describes, into
    `checkpoint_dir` (else a temporary directory). `stats`, if given, receives the rows per round."""
    pred_loss, feat_loss = get_loss(loss), get_loss(feature_loss)
    pairs = list(feature_pairs or []) if feature_weight else []
    if feature_weight and not pairs:
        raise ValueError("feature_weight > 0 needs feature_pairs: [(student module, teacher module), ...]")
    per = per_sample_names(model_inputs, student)
    if "hidden_states" not in per:
        raise ValueError("model_inputs need per-sample 'hidden_states' (the latents)")
    n = model_inputs["hidden_states"].shape[0]
    device, dtype = module_device_dtype(student)
    teacher.requires_grad_(False)
    rounds = getattr(cfg, "student_trajectories", 0)
    data, tmp = None, None
    if rounds and cfg.steps:
        if calibration_meta is None:
            raise DistillError("student_trajectories needs the calibration store's meta (the sampling loop to run "
                               "on the student)", hint="pass calibration_meta=store.meta, or set it to 0")
        if checkpoint_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="dicompress-traj-")
        out = Path(tmp.name) if tmp is not None else \
            Path(checkpoint_dir) / ("trajectories_" + checkpoint_path(Path("."), key).stem)
        data = GrowingRows(ModelInputs(dict(model_inputs), per), student, adapter_for_class(type(student).__name__),
                           calibration_meta, cfg.steps, rounds, out, progress=progress)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        kw = rows(data.inputs if data is not None else model_inputs, per, idx, device, dtype)
        with torch.no_grad(), recording(teacher, [t for _, t in pairs]) as t_feats:
            target = prediction(teacher, kw)
        with recording(student, [s for s, _ in pairs]) as s_feats:
            total = pred_loss(prediction(student, kw), target)
        for s, t in pairs:
            if len(s_feats[s]) != len(t_feats[t]):
                raise ValueError(f"feature pair ({s}, {t}): the modules return {len(s_feats[s])} and "
                                 f"{len(t_feats[t])} tensors")
            total = total + feature_weight * sum(feat_loss(a, b) for a, b in zip(s_feats[s], t_feats[t]))
        return total

    try:
        with trainable_only(student, select_trainable(student, trainable)):
            return train(student, loss_fn, data.rows_at if data is not None else n, cfg, key=key,
                         checkpoint_dir=checkpoint_dir, progress=progress, desc=desc)
    finally:
        if data is not None and stats is not None:
            stats["rows_per_round"] = list(data.rows_per_round)
        if tmp is not None:
            tmp.cleanup()
