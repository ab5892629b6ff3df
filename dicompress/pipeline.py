"""The two entry points: `compress(model, passes)` (Python) and `run(recipe)` (a recipe, end to end)."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from .arch import adapter_for
from .calibrate import check_calibration
from .distributed import init_distributed
from .errors import ArtifactError, SettingsError
from .eval.pipeline_check import check_pipeline_eval, run_pipeline_eval
from .job import Job, has_finished_work, recipe_hash, resolve_device, work_dir_for
from .kernels.dispatch import check_settings
from .models import resolve_model
from .passes import Pass
from .paths import InMemory, Streamed
from .recipe import Recipe, build_passes, load_recipe, override_recipe
from .records import passes_digest
from .runlock import output_lock
from .runner import CalibrationStages, run_passes
from .state import CompressionState
from .stream import check_streamable

__all__ = ["compress", "run", "run_passes", "recipe_hash", "work_dir_for"]


def compress(model, passes: Iterable[Pass | dict], calibration=None, teacher=None, progress: bool = True,
             device: str | torch.device | None = None, work_dir: str | Path | None = None) -> CompressionState:
    """Apply `passes` to `model` in place and return the state (model, manifest, records, report).

    `passes`: Pass objects (e.g. `TLQ(bits=4)`) or recipe-style dicts (`{"tlq": {"bits": 4}}`).
    `calibration`: a CalibrationStore, needed by passes that declare `needs_calibration`. A pass that reads
    block-level calibration after a structural pass needs a store captured on the restructured model: run
    such compositions through `run` (recipes recapture automatically).
    `teacher`: the uncompressed model (or a zero-argument factory), for passes that need one.
    `work_dir`: where training passes checkpoint (a rerun with the same passes resumes); None = no checkpoints.
    """
    passes = build_passes(list(passes))
    for i, p in enumerate(passes):
        if p.needs_calibration and calibration is None:
            raise ValueError(f"pass {p.name!r} (position {i}) needs calibration data: pass calibration=...")
        if p.needs_model_inputs and not _has_model_inputs(calibration):
            raise ValueError(f"pass {p.name!r} (position {i}) reads the calibration's model inputs, and the store "
                             f"{getattr(calibration, 'root', calibration)} holds none: capture it with "
                             "dicompress.calib.capture(..., model_inputs=True) (or block_inputs=True)")
    factory = teacher if callable(teacher) and not isinstance(teacher, torch.nn.Module) else (
        (lambda: teacher) if teacher is not None else None)
    state = CompressionState(model=model, adapter=adapter_for(model), calibration=calibration,
                             teacher_factory=factory, progress=progress,
                             device=torch.device(device) if device else next(model.parameters()).device,
                             work_dir=Path(work_dir) if work_dir is not None else None,
                             recipe_hash=passes_digest(passes))
    run_passes(state, passes, stages=CalibrationStages(calibration))
    return state


def _has_model_inputs(store) -> bool:
    """Whether a store holds the transformer's own inputs (stores that are not on disk are taken at their word)."""
    root = getattr(store, "root", None)
    return store is not None and (root is None or (Path(root) / "model_inputs").is_dir())


def run(recipe: Recipe | str | Path, progress: bool = True, echo=print, overrides: Sequence[str] = (),
        **options) -> dict:
    """Run a recipe end to end: resolve the model, capture calibration, apply the passes (capturing again on
    the model as it is after each structural pass), evaluate, write the artifact. Returns the report.

    Everything a run reads is checked before any work (the recipe, the environment settings, the model's
    config, the calibration's class indices and cache). `<output>.lock` then makes it the only run writing
    `output`: a second one fails at once. Streamable recipes run block by block (`paths.Streamed`), the others
    on the whole model (`paths.InMemory`); the two differ only in how weights arrive and leave. Under torchrun
    (WORLD_SIZE > 1) every rank runs the passes (distillation shards its batches across them); rank 0 alone
    takes the lock, captures calibration (the others wait, then read the store), prints, evaluates and writes
    the artifact. Training passes checkpoint into `<output>.work/`, which is removed once the artifact is
    written and kept when the run fails with finished work in it (a rerun of the same recipe resumes); a
    work directory this run created that holds no finished work is removed when it fails.

    `options` (model=, output=, overwrite= ...; None: not given) replace top-level keys; `overrides` are
    `--set` texts (`"passes[0].tlq.bits=3"`, see `recipe.apply_overrides`), applied before validation so the
    recipe hash, the calibration cache key and the report all see the recipe as run."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, **options)
    elif overrides:
        recipe = override_recipe(recipe, overrides, **options)
    elif options:
        recipe = recipe.model_copy(update={k: v for k, v in options.items() if v is not None})
    passes = recipe.pass_objects()
    try:
        check_settings()
    except ValueError as e:
        raise SettingsError(str(e), hint="DICOMPRESS_KERNELS: auto | reference; DICOMPRESS_GEMM_MODE: auto | "
                                         "decode | int8 | int8_unpacked (README, Kernels)") from None
    info = resolve_model(recipe.model)               # fails fast: before any weight is read
    check_calibration(recipe, info)
    pipeline_eval = check_pipeline_eval(recipe, info)    # eval.prompts: a pipeline to compare with, prompts in the file
    _check_on_model(passes, info, recipe.source_file)    # e.g. width_prune's budget against the shapes
    out = Path(recipe.output)
    lead = int(os.environ.get("RANK", "0")) == 0     # torchrun's ranks share the output: rank 0 locks it
    with output_lock(out, take=lead):
        if out.exists() and not recipe.overwrite:
            raise ArtifactError(f"output {out} already exists", hint="choose another --output, delete it, "
                                "or set `overwrite: true` in the recipe")
        with _work_dir_kept_only_with_work(work_dir_for(out), lead):
            report = _run(recipe, passes, info, progress, echo)
        if pipeline_eval is not None and lead:   # the written output in its pipeline vs the original
            report["pipeline_eval"] = run_pipeline_eval(recipe, info, echo)
        return report


def _run(recipe: Recipe, passes: list[Pass], info, progress: bool, echo) -> dict:
    if check_streamable(passes, recipe.streaming.enabled):
        return Job(recipe, passes, info, resolve_device(recipe.device), progress, echo).run(Streamed())
    device, owns_group = init_distributed(resolve_device(recipe.device))
    try:
        return Job(recipe, passes, info, device, progress, echo).run(InMemory())
    finally:
        if owns_group:
            dist.destroy_process_group()


def _check_on_model(passes: list[Pass], info, file: str | None) -> None:
    """Passes that check the model itself (`Pass.check_model`) do so on its module tree on the meta device (an
    artifact's manifest replayed): no weight is read, nothing is captured."""
    own = [(i, p) for i, p in enumerate(passes) if p.checks_model()]
    if not own:
        return
    from .io.verify import meta_model, read_config
    from .recipe import _recipe_error
    config = read_config(info.path, require_dicompress=False)
    replayed = (config.get("quantization_config") or {}).get("quant_method") == "dicompress"
    model = meta_model(config, replayed=replayed)
    adapter = adapter_for(model)
    problems = [(f"passes[{i}].{p.name}" + (f".{k}" if k else ""), msg) for i, p in own
                for k, msg in p.check_model(model, adapter)]
    if problems:
        raise _recipe_error(problems, file)


@contextmanager
def _work_dir_kept_only_with_work(work_dir: Path, lead: bool):
    """A failed run removes the work directory it created when nothing in it can be resumed: a corrected
    recipe then starts clean instead of meeting a work directory it does not own."""
    fresh = lead and not work_dir.exists()
    try:
        yield
    except BaseException:
        if fresh and work_dir.is_dir() and not has_finished_work(work_dir):
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
