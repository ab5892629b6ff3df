"""The one pass loop: `run_passes(state, passes, scope)` runs passes in order over one scope and returns a
typed record per pass. The whole-model run calls it once (scope None); the streaming sweep once per block.

Composition: a structural pass (`changes_structure`: depth, width, MoE, attention) leaves the calibration's
block-level data (per-block inputs, per-linear statistics) describing blocks that no longer exist.
`CalibrationStages` gives each pass the store it must read: the recipe's capture until a structural pass
has run, then a capture of the model as it now is, taken once per stage and cached like any capture.

Which trajectories: after a structural change, block-level data is captured along the *current* model's own
sampling trajectories, since that is what its blocks see at inference (quantization's statistics and GPTQ
Hessians, and the layer-wise teachers of a later structural pass, are the current blocks). Passes that read
only model-level inputs (`reads_block_data = False`: end-to-end distillation) keep the original capture,
the teacher's trajectories, because their targets are the teacher's predictions on the teacher's path
(`student_trajectories` adds the student's own path where wanted).
"""
from __future__ import annotations

import time
from typing import Callable

from tqdm.auto import tqdm

from .errors import CalibrationError
from .records import PassRecord


class CalibrationStages:
    """The store each pass reads. `recapture(stage, passes_so_far) -> store` captures calibration on the
    model as it is now; it runs at most once per stage, when the first pass after a structural one needs
    block-level data. `on_stage_end(records)` (optional) runs when a structural stage ends and more passes
    follow (the run evaluates the intermediate model there)."""

    def __init__(self, store, recapture: Callable | None = None, on_stage_end: Callable | None = None):
        self.original, self.current = store, store
        self.recapture, self.on_stage_end = recapture, on_stage_end
        self.stage, self.stale = 0, False

    @property
    def fresh(self):
        """The store describing the model as it is now, or None when the structure changed since the last one."""
        return None if self.stale else self.current

    def store_for(self, p, index: int, state):
        if not p.reads_block_data:
            return self.original
        if self.stale and (p.needs_calibration or p.needs_block_inputs or p.needs_model_inputs):
            if self.recapture is None:
                raise CalibrationError(f"{p.name} reads calibration captured block by block, and the model changed "
                                       "its structure since it was captured",
                                       hint="run through dicompress.run (recipes recapture automatically), or "
                                            "pass a store captured on the current model")
            self.current, self.stale = self.recapture(self.stage, index), False
        return self.current

    def after(self, p, index: int, n_passes: int, state, given) -> None:
        if state.calibration is not given:       # the pass wrapped its store (smooth: statistics as smoothed)
            if given is self.current:
                self.current = state.calibration
            if given is self.original:
                self.original = state.calibration
        if getattr(p, "changes_structure", False):
            self.stage, self.stale = self.stage + 1, True
            if self.on_stage_end is not None and index + 1 < n_passes:
                self.on_stage_end(state, index)


def run_passes(state, passes: list, scope: tuple[str, ...] | None = None,
               stages: CalibrationStages | None = None) -> list[PassRecord]:
    """Run `passes` in order on `state` within `scope` (None: the whole model; a tuple of block names: only
    those, the streaming sweep). Returns this call's records (also appended to `state.records`)."""
    state.scope = scope
    where = None if scope is None else ",".join(scope)
    done: list[PassRecord] = []
    bar = tqdm(passes, desc="passes", unit="pass", disable=not state.progress or len(passes) < 2)
    for i, p in enumerate(bar):
        bar.set_postfix_str(p.name)
        if stages is not None:
            state.calibration = stages.store_for(p, i, state)
        given = state.calibration
        state.pass_index = i
        state.current = rec = PassRecord(i, p.name, p.config.model_dump(mode="json"), where)
        t0 = time.perf_counter()
        try:
            p.apply(state)
        finally:
            state.current = None
        rec.seconds = time.perf_counter() - t0
        state.records.append(rec)
        done.append(rec)
        if stages is not None:
            stages.after(p, i, len(passes), state, given)
    return done
