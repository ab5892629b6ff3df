"""Steps the passes that retrain what they restructure share (depth passes, ppcl_width, dense2moe): the block
store check, the teacher check, and the optional end-to-end recovery distillation."""
from __future__ import annotations

import time

from ..distill import distill_end_to_end
from ..errors import DistillError


def block_store(name: str, state, store):
    """`store`, after checking it was captured on this model's blocks (these passes read block inputs by name)."""
    names = [r.name for r in state.adapter.blocks(state.model)]
    captured = store.block_names
    if captured and captured != names:
        raise DistillError(f"{name}: the calibration store was captured on blocks {captured[:3]}... but the model "
                           f"has {names[:3]}...",
                           hint="capture calibration on the model this pass changes (delete the cache entry)")
    return store


def check_teacher(name: str, state, end_to_end) -> None:
    if end_to_end is not None and state.teacher_factory is None:
        raise DistillError(f"{name}: end_to_end distillation needs the uncompressed teacher, and none can be built "
                           "here", hint="pass teacher=... to dicompress.compress, or set `end_to_end: null`")


def end_to_end(name: str, state, store, cfg) -> dict | None:
    """End-to-end distillation of every block parameter on the calibration's model inputs (None: not asked)."""
    if cfg is None or cfg.steps == 0:
        return None
    t, stats = time.perf_counter(), {}
    losses = distill_end_to_end(state.model, state.teacher, store.model_inputs(), cfg,
                                key=state.checkpoint_key(f"{name}:end_to_end"), checkpoint_dir=state.work_dir,
                                progress=state.progress,
                                trainable=[f"{attr}.*" for attr, _ in state.adapter.block_lists],
                                calibration_meta=store.meta, stats=stats)
    return {"steps": len(losses), "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "seconds": round(time.perf_counter() - t, 2), **stats}
