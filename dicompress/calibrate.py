"""A run's calibration: the recipe's capture, found in the cache or taken, on the model as given or (after a
structural pass) on the model as it now is."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .calib import CalibrationStore, capture
from .calib.prompt_encoding import check_prompt_pipeline, prompt_embeddings, text_stamp
from .calib.sources import calls_per_step, read_prompts
from .distributed import barrier
from .records import passes_digest
from .errors import CalibrationError
from .zoo import CONDITIONING_NAME


def cache_root(recipe) -> Path:
    base = (recipe.calibration and recipe.calibration.cache_dir) or os.environ.get("DICOMPRESS_CACHE") \
        or os.path.join(os.path.expanduser("~"), ".cache", "dicompress")
    return Path(base) / "calib"


# what a capture holds besides the linear statistics, as its cache key names it
BLOCK_AND_MODEL_INPUTS = "block+model_inputs:per_call"
MODEL_INPUTS = "model_inputs:per_call"


def capture_what(cfg, readers) -> str | bool:
    """What the capture read by the passes `readers` holds: every block's inputs (and the model inputs) when
    one of them needs block inputs (or `block_inputs: true`), the model inputs alone when one needs only those
    (end-to-end passes), else statistics only (False)."""
    blocks = any(p.needs_block_inputs for p in readers) if cfg.block_inputs == "auto" else bool(cfg.block_inputs)
    if blocks:
        return BLOCK_AND_MODEL_INPUTS
    return MODEL_INPUTS if any(getattr(p, "needs_model_inputs", False) for p in readers) else False


def original_readers(passes) -> list:
    """The passes that read the recipe's own capture: those up to the first structural pass (the passes after
    it read a capture of the restructured model, `stage_store`) and those reading model-level inputs only
    (`reads_block_data = False`), which keep the teacher's trajectories (runner.CalibrationStages)."""
    nxt = next((j for j, p in enumerate(passes) if getattr(p, "changes_structure", False)), len(passes))
    return list(passes[:nxt + 1]) + [p for p in passes[nxt + 1:] if not getattr(p, "reads_block_data", True)]


def _calib_key(info, recipe, block_inputs, dtype) -> str:
    weights = sorted(info.path.glob("*.safetensors"))
    stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]
    # block inputs come with the model's own inputs (and one chunk per model call): older stores are not reused
    what = block_inputs if isinstance(block_inputs, str) else (BLOCK_AND_MODEL_INPUTS if block_inputs else False)
    cfg = recipe.calibration
    # keys added later leave the blob as it was while unset, and classes / synthetic captures stamp no inputs:
    # their cached stores stay valid
    later = ({"max_sequence_length"} if cfg.max_sequence_length is None else set()) | \
        ({"store_dtype"} if cfg.store_dtype == "float32" else set())
    parts = [str(info.path.resolve()), stamp, cfg.model_dump(mode="json", exclude=later), what, str(dtype)]
    inputs = _inputs_stamp(cfg, info)
    if inputs is not None:
        parts.append(inputs)
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _inputs_stamp(cfg, info):
    """What a capture reads besides the transformer and the recipe's keys: the prompts themselves and the text
    encoders' files (`prompts`), the embeddings file (`embeddings`), so an edited file is not served a stale
    capture."""
    if cfg.source == "prompts":
        return ["prompts", read_prompts(cfg.prompts), text_stamp(info.pipeline_root)]
    if cfg.source == "embeddings":
        st = Path(cfg.embeddings).stat()
        return ["embeddings", st.st_size, int(st.st_mtime)]
    return None


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's parameters and buffers: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def capture_info(info) -> dict:
    """What a capture records of the model (and what its sources read: the class table, the pipeline)."""
    return {"name": info.name, "path": info.path, "pipeline_root": info.pipeline_root}


def source_info(recipe, info, device, dtype, echo) -> dict:
    """`capture_info`, and for the `prompts` source the prompts' embeddings file (encoded now by the pipeline's
    text encoders alone, or found in the cache): what the capture samples from."""
    out = capture_info(info)
    cfg = recipe.calibration
    if cfg.source == "prompts":
        out["prompt_embeddings"] = prompt_embeddings(info.pipeline_root, read_prompts(cfg.prompts),
                                                     cache_root(recipe) / "prompt_embeddings", device, dtype,
                                                     cfg.max_sequence_length, echo)
    return out


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def check_source(recipe, info) -> None:
    cfg = recipe.calibration
    if cfg is not None and cfg.source == "classes" and not info.is_zoo:
        raise CalibrationError(f"calibration source 'classes' needs a model with a class-conditioning table "
                               f"(zoo models and their artifacts); {info.name} has none",
                               hint="use source: prompts, embeddings or synthetic")


def recipe_store(recipe, passes, info, model, adapter, dtype, progress, echo, lead: bool = True,
                 first_block_only: bool = False, before_capture=None):
    """The recipe's calibration store: reused from the cache when the same capture exists, else captured (by
    rank 0; the other ranks wait for it; `before_capture()` runs first). None when the recipe has none."""
    cfg = recipe.calibration
    if cfg is None:
        return None
    check_source(recipe, info)
    what = "first_block+model_inputs" if first_block_only else capture_what(cfg, original_readers(passes))
    roots = [cache_root(recipe) / _calib_key(info, recipe, w, dtype) for w in _acceptable(what)]

    def take():
        if before_capture is not None:
            before_capture()
        return capture(model, adapter, cfg, source_info(recipe, info, _device_of(model), dtype, echo), roots[0],
                       block_inputs=what == BLOCK_AND_MODEL_INPUTS, model_inputs=what == MODEL_INPUTS,
                       progress=progress, first_block_only=first_block_only)
    return _cached(roots, lead, echo, take)


def _acceptable(what) -> list:
    """The captures that serve `what`, its own first: a capture with block inputs holds the model inputs too, so
    a finished one (a recipe that also had a block-input pass) is reused rather than capturing again."""
    return [what, BLOCK_AND_MODEL_INPUTS] if what == MODEL_INPUTS else [what]


def _cached(roots: list[Path], lead: bool, echo, take):
    """The first finished store of `roots`, else `take()` (which writes `roots[0]`)."""
    if not lead:
        barrier()                                  # rank 0 captures (or finds) the store
        return CalibrationStore(next((r for r in roots if (r / "meta.json").exists()), roots[0]))
    found = next((r for r in roots if (r / "meta.json").exists()), None)
    if found is not None:
        store = CalibrationStore(found)
        echo(f"calibration: reusing {found}")
    else:
        _require_writable(roots[0].parent)
        store = take()
    barrier()
    return store


def stage_store(recipe, passes, info, state, stage: int, index: int, dtype, progress, echo, lead: bool = True):
    """Calibration captured on `state.model` as a structural pass left it (stage `stage`, before pass `index`):
    the recipe's calibration set along the model's own sampling trajectories, with block inputs when a pass of
    this stage reads them. Cached under the recipe's capture key, the passes so far and the model's digest."""
    cfg = recipe.calibration
    rest = passes[index:]
    nxt = next((j for j, p in enumerate(rest) if getattr(p, "changes_structure", False)), len(rest))
    # model-level-only passes read the recipe's own capture, not this one
    what = capture_what(cfg, [p for p in rest[:nxt + 1] if getattr(p, "reads_block_data", True)])
    stamp = f"{stage}:{passes_digest(passes[:index])}:{model_digest(state.model)}"
    roots = []
    for w in _acceptable(what):
        base = _calib_key(info, recipe, w, dtype)
        key = hashlib.sha256(f"{base}:{stamp}".encode()).hexdigest()[:16]
        roots.append(cache_root(recipe) / f"{base}-stage{stage}-{key}")
    echo(f"calibration: stage {stage}: the model changed structure; capturing {cfg.source} calibration on it")
    model = state.model.eval()
    return _cached(roots, lead, echo, lambda: capture(model, state.adapter, cfg,
                                                      source_info(recipe, info, _device_of(model), dtype, echo),
                                                      roots[0], block_inputs=what == BLOCK_AND_MODEL_INPUTS,
                                                      model_inputs=what == MODEL_INPUTS, progress=progress))


def hint_block_batch(recipe, info, n_blocks: int, echo) -> None:
    """A streamed capture reads every block at every model call: say so when fewer calls would do."""
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


def class_rows(table: Path) -> int:
    """Rows of a class-conditioning table (its `prompt_embeds`), read from the header only."""
    try:
        with safe_open(str(table), "pt") as f:
            return f.get_slice("prompt_embeds").get_shape()[0]
    except (OSError, SafetensorError, KeyError) as e:
        raise CalibrationError(f"cannot read the class table {table}: {e}",
                               hint="it must be a safetensors file with prompt_embeds and pooled_prompt_embeds") \
            from None


def _check_prompts(path: str) -> None:
    try:
        prompts = read_prompts(path)
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"calibration.prompts: cannot read {path} as UTF-8 text: {e}",
                               hint="a prompt file is text, one prompt per line") from None
    if not prompts:
        raise CalibrationError(f"calibration.prompts: {path} holds no prompts",
                               hint="one prompt per line; blank lines and # comments are skipped")


def check_calibration(recipe, info) -> None:
    """What the capture will read and write, before any weight is read: the source fits the model, every class
    index is a row of the class table, and the calibration cache can be written."""
    cfg = recipe.calibration
    if cfg is None:
        return
    check_source(recipe, info)
    if cfg.source == "prompts":
        _check_prompts(cfg.prompts)
        check_prompt_pipeline(info.pipeline_root, info.path)     # the text encoders are there (listing only)
    if cfg.source in ("classes", "embeddings"):
        table = Path(cfg.embeddings) if cfg.source == "embeddings" else info.path / CONDITIONING_NAME
        rows = class_rows(table)
        bad = sorted({c for c in cfg.classes or () if c >= rows})
        if bad:
            raise CalibrationError(f"calibration.classes: {bad} out of range: the class table {table} has {rows} "
                                   f"rows (classes 0..{rows - 1})", hint="pick class indices below "
                                   f"{rows}, or leave `classes` out to use every row")
    root = cache_root(recipe)
    # a read-only cache that already holds finished captures (a shared, pre-filled cache) may hold this one:
    # `_cached` refuses it only if this run's capture is missing
    if not any(root.glob("*/meta.json")):
        _require_writable(root)


def _require_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise CalibrationError(f"the calibration cache {root} is not writable: {e.strerror or e}",
                               hint="set `calibration.cache_dir` or DICOMPRESS_CACHE to a writable directory") \
            from None
