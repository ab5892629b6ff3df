"""Runs passes in order over one CompressionState; `run(recipe)` is the whole job end to end."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .arch import adapter_for
from .passes import Pass
from .recipe import Recipe, build_passes, load_recipe
from .state import CompressionState

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compress(model, passes: Iterable[Pass | dict], calibration=None, teacher=None, progress: bool = True,
             device: str | torch.device | None = None, work_dir: str | Path | None = None) -> CompressionState:
    """Apply `passes` to `model` in place and return the state (model, manifest, report).

    `passes`: Pass objects (e.g. `TLQ(bits=4)`) or recipe-style dicts (`{"tlq": {"bits": 4}}`).
    `calibration`: a CalibrationStore, needed by passes that declare `needs_calibration`.
    `teacher`: the uncompressed model (or a zero-argument factory), for passes that need one.
    `work_dir`: where training passes checkpoint (a rerun with the same passes resumes); None = no checkpoints.
    """
    passes = build_passes(list(passes))
    for i, p in enumerate(passes):
        if p.needs_calibration and calibration is None:
            raise ValueError(f"pass {p.name!r} (position {i}) needs calibration data: pass calibration=...")
    factory = teacher if callable(teacher) and not isinstance(teacher, torch.nn.Module) else (
        (lambda: teacher) if teacher is not None else None)
    state = CompressionState(model=model, adapter=adapter_for(model), calibration=calibration,
                             teacher_factory=factory, progress=progress,
                             device=torch.device(device) if device else next(model.parameters()).device,
                             work_dir=Path(work_dir) if work_dir is not None else None,
                             recipe_hash=_digest([{p.name: p.config.model_dump(mode="json")} for p in passes]))
    run_passes(state, passes)
    return state


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_hash(recipe: Recipe) -> str:
    """What a checkpoint must match to be resumed: the recipe's model, calibration and passes."""
    cal = recipe.calibration.model_dump(mode="json") if recipe.calibration is not None else None
    return _digest({"model": recipe.model, "calibration": cal, "passes": recipe.passes})


def work_dir_for(output: str | Path) -> Path:
    """`<output>.work/`: checkpoints of the run writing `output`; removed once the artifact is written."""
    out = Path(output)
    return out.with_name(out.name + ".work")


def run_passes(state: CompressionState, passes: list[Pass]) -> None:
    bar = tqdm(passes, desc="passes", unit="pass", disable=not state.progress or len(passes) < 2)
    for i, p in enumerate(bar):
        state.pass_index = i
        bar.set_postfix_str(p.name)
        t0 = time.perf_counter()
        n_before = len(state.report["passes"])
        p.apply(state)
        secs = round(time.perf_counter() - t0, 3)
        if len(state.report["passes"]) == n_before:   # a pass that reported nothing still gets a row
            state.add_pass_report(p.name, {})
        state.report["passes"][-1].setdefault("seconds", secs)
        state.report["passes"][-1].setdefault("config", p.config.model_dump(mode="json"))


def resolve_device(policy: str) -> torch.device:
    if policy == "cuda" and not torch.cuda.is_available():
        from .errors import DicompressError
        raise DicompressError("recipe asks for device: cuda but no CUDA GPU is visible",
                              hint="set `device: auto` or `device: cpu` in the recipe")
    if policy == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(policy)


def resolve_dtype(policy: str, device: torch.device) -> torch.dtype:
    if policy == "auto":   # bf16/fp16 matmul on CPU is ~250x slower than fp32: compute fp32 there
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[policy]


def resolve_save_dtype(policy: str, info) -> torch.dtype:
    from .io.storage import stored_dtype
    return stored_dtype(info.path) if policy == "auto" else getattr(torch, policy)


def cache_root(recipe: Recipe) -> Path:
    base = (recipe.calibration and recipe.calibration.cache_dir) or os.environ.get("DICOMPRESS_CACHE") \
        or os.path.join(os.path.expanduser("~"), ".cache", "dicompress")
    return Path(base) / "calib"


def _calib_key(info, recipe: Recipe, block_inputs, dtype) -> str:
    weights = sorted(info.path.glob("*.safetensors"))
    stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]
    # block inputs come with the model's own inputs (and one chunk per model call): older stores are not reused
    what = block_inputs if isinstance(block_inputs, str) else ("block+model_inputs:per_call" if block_inputs else False)
    blob = json.dumps([str(info.path.resolve()), stamp, recipe.calibration.model_dump(mode="json"),
                       what, str(dtype)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ranks wait for rank 0 at barriers while it captures calibration or evaluates: allow hours, not gloo's 30 min
DIST_TIMEOUT = datetime.timedelta(hours=6)


def init_distributed(device: torch.device) -> tuple[torch.device, bool]:
    """Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) join the process group: nccl on CUDA (one GPU
    per local rank), gloo on CPU. Returns (this rank's device, whether this call initialised the group)."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    return device, True


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def run(recipe: Recipe | str | Path, progress: bool = True, echo=print, **overrides) -> dict:
    """Run a recipe end to end: resolve the model, capture calibration, apply the passes, evaluate,
    write the artifact. Returns the report.

    Under torchrun (WORLD_SIZE > 1) every rank runs the passes (distillation shards its batches across
    them); rank 0 alone captures calibration (the others wait, then read the store), prints, evaluates and
    writes the artifact. Training passes checkpoint into `<output>.work/`, which is removed once the
    artifact is written and kept when the run fails, so a rerun of the same recipe resumes."""
    from .models import resolve_model

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, **overrides)
    elif overrides:
        recipe = recipe.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    passes = recipe.pass_objects()
    info = resolve_model(recipe.model)               # fails fast: before any weight is read
    out = Path(recipe.output)
    if out.exists() and not recipe.overwrite:
        from .errors import ArtifactError
        raise ArtifactError(f"output {out} already exists", hint="choose another --output, delete it, "
                            "or set `overwrite: true` in the recipe")
    from .stream import check_streamable
    if check_streamable(passes, recipe.streaming.enabled):
        return _run_streaming(recipe, passes, info, out, resolve_device(recipe.device), progress, echo)
    device, owns_group = init_distributed(resolve_device(recipe.device))
    try:
        return _run(recipe, passes, info, out, device, progress, echo)
    finally:
        if owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _capture_calibration(recipe: Recipe, passes: list[Pass], info, model, adapter, dtype, progress, echo,
                         lead: bool = True, first_block_only: bool = False, before_capture=None):
    """The recipe's calibration store: reused from the cache when the same capture exists, else captured (by
    rank 0; the other ranks wait for it; `before_capture()` runs first). None when the recipe has no
    calibration."""
    from .calib import CalibrationStore, capture
    from .errors import CalibrationError
    cfg = recipe.calibration
    if cfg is None:
        return None
    if cfg.source == "classes" and not info.is_zoo:
        raise CalibrationError(f"calibration source 'classes' needs a model with a class-conditioning table "
                               f"(zoo models); {info.name} has none",
                               hint="use source: prompts, embeddings or synthetic")
    need = any(p.needs_block_inputs for p in passes)
    block_inputs = need if cfg.block_inputs == "auto" else bool(cfg.block_inputs)
    what = "first_block+model_inputs" if first_block_only else block_inputs
    root = cache_root(recipe) / _calib_key(info, recipe, what, dtype)
    if not lead:
        _barrier()                                 # rank 0 captures (or finds) the store
        return CalibrationStore(root)
    if (root / "meta.json").exists():
        store = CalibrationStore(root)
        echo(f"calibration: reusing {root}")
    else:
        if before_capture is not None:
            before_capture()
        store = capture(model, adapter, cfg, {"name": info.name, "path": info.path,
                                              "pipeline_root": info.pipeline_root},
                        root, block_inputs=block_inputs, progress=progress, first_block_only=first_block_only)
    _barrier()
    return store


def _hint_block_batch(recipe: Recipe, info, n_blocks: int, echo) -> None:
    """A streamed capture reads every block at every model call: say so when fewer calls would do."""
    from .calib.sources import calls_per_step
    cfg = recipe.calibration
    try:
        plan = calls_per_step(cfg, {"path": info.path})
    except (OSError, KeyError, ValueError):         # the capture itself reports what is wrong
        return
    floor = len(cfg.seeds) if cfg.source == "prompts" else 1    # the prompts loop runs each seed on its own
    if plan is None or plan[0] <= floor:
        return
    calls, samples = plan
    echo(f"calibration: {calls} model calls per sampling step, each reading all {n_blocks} blocks from the "
         f"checkpoint; `batch_size: {samples // floor}, block_batch: {cfg.block_batch or cfg.batch_size}` would "
         f"make {floor} (the same rows, the same activation memory per block)")


def _run_streaming(recipe: Recipe, passes: list[Pass], info, out: Path, device: torch.device, progress: bool,
                   echo) -> dict:
    """The block-by-block path (stream/sweep.py): the same passes, report and artifact as `_run`, with one
    block's weights in memory at a time."""
    from .eval import dir_bytes
    from .io import load, write_artifact_from_shards
    from .models import load_transformer
    from .report import artifact_files, build_report
    from .stream import Sweep, merge_records

    dtype = resolve_dtype(recipe.dtype, device)
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    work_dir = work_dir_for(out)
    save_dtype = resolve_save_dtype(recipe.save_dtype, info)
    key = f"{recipe_hash(recipe)}:{recipe.streaming.propagate}:{dtype}:{save_dtype}"
    sweep = Sweep(info, passes, dtype=dtype, save_dtype=save_dtype, device=device, work_dir=work_dir, key=key,
                  propagate=recipe.streaming.propagate, progress=progress)
    timings["load"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    with sweep.capture_model() as model:
        store = _capture_calibration(recipe, passes, info, model, sweep.adapter, dtype, progress, echo,
                                     first_block_only=True,
                                     before_capture=lambda: _hint_block_batch(recipe, info, len(sweep.names), echo))
    timings["calibration"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    records = sweep.run(store)
    timings["passes"] = time.perf_counter() - t2
    manifest, merged = merge_records(passes, records)
    state = sweep.state
    state.scope, state.calibration, state.manifest, state.report = None, None, manifest, merged
    state.teacher_factory = lambda: load_transformer(info, dtype, device)  # noqa: E731  (evaluation only)
    state.progress = progress

    written: dict = {}

    def finish(tmp: Path):
        if recipe.eval.enabled and info.is_zoo:       # evaluate the artifact as written (it fits: a zoo model)
            state.model = load(tmp, device=device, torch_dtype=dtype)
        report = build_report(state, recipe, info, passes, progress=progress, timings=timings)
        report["streaming"] = {**merged["streaming"], "enabled": True, "propagate": recipe.streaming.propagate}
        if store is not None:
            report["calibration"] = {k: store.meta.get(k) for k in ("source", "seeds", "steps", "samples", "rows")}
        written["report"] = report
        return report, artifact_files(state, recipe, info, report)

    t3 = time.perf_counter()
    source = {"model": info.name, "class": info.class_name, "recipe": recipe.source_file}
    write_artifact_from_shards(sweep.model, sweep.shards(), out, manifest=manifest, source=source, finish=finish,
                               overwrite=recipe.overwrite)
    report = written["report"]
    report["footprint"]["bytes_on_disk"] = dir_bytes(out)
    report["seconds"]["write"] = round(time.perf_counter() - t3 - report["seconds"].get("eval", 0.0), 2)
    shutil.rmtree(work_dir, ignore_errors=True)      # the artifact is complete: the finished blocks are in it
    report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return report


def _run(recipe: Recipe, passes: list[Pass], info, out: Path, device: torch.device, progress: bool, echo) -> dict:
    from .distill import rank_world
    from .models import load_transformer

    rank, _ = rank_world()
    lead = rank == 0
    progress = progress and lead
    echo = echo if lead else (lambda *a, **k: None)
    dtype = resolve_dtype(recipe.dtype, device)
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = load_transformer(info, dtype, device)
    adapter = adapter_for(model)
    timings["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    store = _capture_calibration(recipe, passes, info, model, adapter, dtype, progress, echo, lead=lead)
    if store is not None:
        timings["calibration"] = time.perf_counter() - t1

    teacher_factory = lambda: load_transformer(info, dtype, device)  # noqa: E731
    work_dir = work_dir_for(out)
    state = CompressionState(model=model, adapter=adapter, calibration=store, teacher_factory=teacher_factory,
                             device=device, progress=progress, work_dir=work_dir, recipe_hash=recipe_hash(recipe))
    t2 = time.perf_counter()
    run_passes(state, passes)
    timings["passes"] = time.perf_counter() - t2
    if not lead:                                      # rank 0 evaluates and writes; wait until it is done
        _barrier()
        return {"rank": rank, "passes": state.report["passes"]}

    from .io.storage import round_parameters
    from .report import build_report, write_run_artifact
    save_dtype = resolve_save_dtype(recipe.save_dtype, info)
    round_parameters(state.model, save_dtype)         # evaluate what the artifact will hold
    report = build_report(state, recipe, info, passes, progress=progress, timings=timings)
    write_run_artifact(state, recipe, info, report, progress=progress, save_dtype=save_dtype)
    shutil.rmtree(work_dir, ignore_errors=True)      # the artifact is complete: checkpoints are no longer needed
    report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    _barrier()
    return report
