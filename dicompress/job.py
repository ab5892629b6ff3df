"""One recipe run, the same steps whichever way the weights arrive and leave (`paths.InMemory` or
`paths.Streamed`): load -> calibration -> passes -> evaluation and report -> artifact -> clean-up. The artifact is
written alone or, when the model is a diffusers pipeline directory, as a complete pipeline (`output_layout`)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .distill import rank_world
from .distributed import barrier
from .errors import DicompressError, ModelError, RecipeError
from .eval import dir_bytes
from .io.storage import stored_dtype
from .io.manifest import STRUCTURAL_OPS
from .io.verify import artifact_root, read_config
from .io.pipeline_output import PipelineOutput, pipeline_components
from .models import load_transformer
from .records import combine
from .report import Report, build_report, evaluate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_hash(recipe) -> str:
    """What a checkpoint must match to be resumed: the recipe's model, calibration and passes."""
    cal = recipe.calibration.model_dump(mode="json") if recipe.calibration is not None else None
    return _digest({"model": recipe.model, "calibration": cal, "passes": recipe.passes})


def work_dir_for(output: str | Path) -> Path:
    """`<output>.work/`: checkpoints of the run writing `output`; removed once the artifact is written."""
    out = Path(output)
    return out.with_name(out.name + ".work")


def has_finished_work(work_dir: Path) -> bool:
    """Whether a work directory holds something a rerun resumes: a training checkpoint (`*.pt`) or a finished
    streamed block (`stream/records/*.json`)."""
    return any(work_dir.rglob("*.pt")) or any((work_dir / "stream" / "records").glob("*.json"))


def resolve_device(policy: str) -> torch.device:
    if policy == "cuda" and not torch.cuda.is_available():
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
    return stored_dtype(info.path) if policy == "auto" else getattr(torch, policy)


def source_manifest(model_dir: Path) -> list[dict]:
    """The manifest of a model that is itself a dicompress artifact (a chained recipe), else []."""
    qc = read_config(model_dir, require_dicompress=False).get("quantization_config") or {}
    manifest = list(qc.get("manifest", [])) if qc.get("quant_method") == "dicompress" else []
    rewritten = sorted({e["op"] for e in manifest} - STRUCTURAL_OPS)
    if rewritten:
        raise ModelError(f"{model_dir} is a dicompress artifact whose modules were already rewritten "
                         f"({', '.join(rewritten)}); dicompress compresses uncompressed or only restructured models",
                         hint="run the recipe on the original model, or chain recipes as prune -> quantize")
    return manifest



def _given_pipeline_dir(info) -> bool:
    """Whether the recipe's `model` named a pipeline directory itself (or a hub id: its snapshot is one), not the
    transformer folder inside one."""
    if info.pipeline_root is None:
        return False
    given = Path(os.path.expanduser(info.name))
    return not given.is_dir() or given.resolve() == Path(info.pipeline_root).resolve()


def output_layout(recipe, info) -> PipelineOutput | None:
    """What the run writes: a PipelineOutput (the output is a complete pipeline directory whose transformer/ is the
    artifact) or None (the artifact alone). `auto`: a pipeline when the recipe's model is a pipeline directory.
    Checked before any work: `pipeline` needs a pipeline to take the other components from, and that pipeline's
    model_index.json must name folders that exist."""
    layout = recipe.output_layout
    if layout == "transformer" or (layout == "auto" and not _given_pipeline_dir(info)):
        return None
    if info.pipeline_root is None:
        raise RecipeError(f"`pipeline` writes a complete pipeline directory, but the model {info.name} is a "
                          f"transformer alone ({info.path}), with no model_index.json, text encoders or VAE "
                          "to put beside it", file=recipe.source_file, key="output_layout",
                          hint="set `output_layout: auto` or `transformer`, or give a diffusers pipeline directory "
                               "as the model (--model PATH)")
    pipeline_components(info.pipeline_root)
    return PipelineOutput(Path(info.pipeline_root), copy=recipe.copy_components)


class Job:
    """One recipe run on one process (each torchrun rank has its own; rank 0 leads). `run(path)` is the
    whole run; `path` (paths.InMemory or paths.Streamed) supplies load, calibrate, compress and write."""

    def __init__(self, recipe, passes, info, device: torch.device, progress: bool, echo):
        self.rank = rank_world()[0]
        self.lead = self.rank == 0
        self.recipe, self.passes, self.info, self.device = recipe, passes, info, device
        self.progress = progress and self.lead
        self.echo = echo if self.lead else (lambda *a, **k: None)
        self.out, self.work_dir = Path(recipe.output), work_dir_for(recipe.output)
        self.dtype = resolve_dtype(recipe.dtype, device)
        self.save_dtype = resolve_save_dtype(recipe.save_dtype, info)
        self.recipe_hash = recipe_hash(recipe)
        self.source = {"model": info.name, "class": info.class_name, "recipe": recipe.source_file}
        self.evaluates = bool(recipe.eval.enabled and info.is_zoo)
        self.timings: dict[str, float] = {}
        self.base_manifest = source_manifest(info.path)
        self.layout = output_layout(recipe, info)        # PipelineOutput, or None: the artifact alone
        self.stages: list[dict] = []          # quality after each structural stage that more passes follow

    @contextmanager
    def timed(self, key: str):
        t = time.perf_counter()
        yield
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t

    def teacher(self):
        """A fresh uncompressed model (evaluation and the passes that need a teacher)."""
        return load_transformer(self.info, self.dtype, self.device)

    def stage_end(self, state, index: int) -> None:
        """A structural stage ended and more passes follow: its model's quality, for the report's `stages`."""
        entry = {"after": f"passes[{index}].{self.passes[index].name}",
                 "passes": [p.name for p in self.passes[:index + 1]]}
        if self.evaluates and self.lead:
            with torch.random.fork_rng(devices=[]), self.timed("eval_stages"):   # (inside "passes" too)
                entry["metrics"], _ = evaluate(state.model, state.teacher, self.info, self.recipe.eval,
                                               self.progress)
        self.stages.append(entry)

    def run(self, path) -> dict:
        t0 = time.perf_counter()
        torch.manual_seed(self.recipe.seed)
        with self.timed("load"):
            path.load(self)
        with self.timed("calibration"):
            store = path.calibrate(self)
        if store is None:
            self.timings.pop("calibration")
        with self.timed("passes"):
            records = path.compress(self, store)
        if not self.lead:                                  # rank 0 evaluates and writes; wait until it is done
            barrier()
            return {"rank": self.rank, "passes": [r.to_json() for r in records]}
        manifest, part = combine(self.passes, records)
        manifest = self.base_manifest + manifest          # a dicompress artifact as the model: its changes stay
        t_write = time.perf_counter()
        report = path.write(self, manifest, lambda model, teacher, **kw: self.report(model, part, store, teacher, **kw))
        report.footprint["bytes_on_disk"] = dir_bytes(artifact_root(self.out))   # the artifact's own bytes
        if self.layout is not None:
            report.sections["pipeline_output"] = self.layout.result
        report.seconds["write"] = time.perf_counter() - t_write - report.seconds.get("eval", 0.0)
        shutil.rmtree(self.work_dir, ignore_errors=True)   # the artifact is complete: checkpoints are not needed
        report.seconds["total"] = time.perf_counter() - t0
        barrier()
        return report.to_dict()

    def report(self, model, part: dict, store, teacher, stats_store=None, recaptured=None) -> Report:
        """The run's report; the final stage's metrics close `stages` when the recipe had several."""
        stages = None
        if self.stages:
            stages = self.stages + [{"after": f"passes[{len(self.passes) - 1}].{self.passes[-1].name}",
                                     "passes": [p.name for p in self.passes]}]
        rep = build_report(model=model, part=part, recipe=self.recipe, info=self.info, device=self.device,
                           timings=self.timings, store=store, stats_store=stats_store, teacher=teacher,
                           stages=stages, recaptured=recaptured, progress=self.progress)
        if stages is not None and rep.metrics is not None:
            stages[-1]["metrics"] = rep.metrics
        return rep
