"""How a run's weights arrive and leave: the whole model in memory, or one block at a time (streaming).

Both give `Job.run` the same four steps: `load`, `calibrate` (the recipe's store), `compress` (the pass
records, through `runner.run_passes`) and `write` (report and artifact, atomically).
"""
from __future__ import annotations

from .arch import adapter_for
from .calibrate import hint_block_batch, recipe_store, stage_store
from .io import load, write_artifact, write_artifact_from_shards
from .io.load_check import LoadCheck
from .io.storage import round_parameters
from .models import load_transformer
from .probes import model_probes
from .report import artifact_files
from .runner import CalibrationStages, run_passes
from .state import CompressionState
from .stream import Sweep, block_records, streaming_section

# the journal's record format: a work directory of another format is not resumed
RECORDS_FORMAT = "records2"


class InMemory:
    """The whole model in memory; a structural pass is followed by a capture on the model as it now is."""

    def load(self, job) -> None:
        self.model = load_transformer(job.info, job.dtype, job.device)
        self.adapter = adapter_for(self.model)

    def calibrate(self, job):
        return recipe_store(job.recipe, job.passes, job.info, self.model, self.adapter, job.dtype, job.progress,
                            job.echo, lead=job.lead)

    def compress(self, job, store):
        self.state = state = CompressionState(
            model=self.model, adapter=self.adapter, calibration=store, teacher_factory=job.teacher,
            device=job.device, progress=job.progress, work_dir=job.work_dir, recipe_hash=job.recipe_hash)
        self.captures: list[dict] = []

        def recapture(stage: int, index: int):
            new = stage_store(job.recipe, job.passes, job.info, state, stage, index, job.dtype, job.progress,
                              job.echo, lead=job.lead)
            self.captures.append({"stage": stage, "before": f"passes[{index}].{job.passes[index].name}",
                                  "rows": new.meta.get("rows"), "samples": new.meta.get("samples")})
            return new

        self.stages = CalibrationStages(store, recapture if store is not None else None, job.stage_end)
        run_passes(state, job.passes, stages=self.stages)
        return state.records

    def write(self, job, manifest, make_report):
        round_parameters(self.model, job.save_dtype)         # evaluate what the artifact will hold
        teacher = self.state.teacher if job.evaluates else None
        report = make_report(self.model, teacher, stats_store=self.stages.fresh, recaptured=self.captures)
        files = artifact_files(self.state.files, report, job.recipe, job.info)
        check = LoadCheck(model_probes(self.model, self.adapter), dtype=job.dtype, device=job.device)
        write_artifact(self.model, job.out, manifest=manifest, report=report.to_dict(), source=job.source,
                       files=files, overwrite=job.recipe.overwrite, save_dtype=job.save_dtype, check=check,
                       pipeline=job.layout)
        report.sections["load_check"] = check.result
        return report


class Streamed:
    """One block's weights in memory at a time (stream/sweep.py); the artifact is built from the blocks'
    shards, and evaluated (zoo models) by loading it from its temporary directory."""

    def load(self, job) -> None:
        r = job.recipe
        key = f"{job.recipe_hash}:{r.streaming.propagate}:{job.dtype}:{job.save_dtype}:{RECORDS_FORMAT}"
        self.sweep = Sweep(job.info, job.passes, dtype=job.dtype, save_dtype=job.save_dtype, device=job.device,
                           work_dir=job.work_dir, key=key, propagate=r.streaming.propagate, progress=job.progress)

    def calibrate(self, job):
        sweep = self.sweep
        with sweep.capture_model() as model:
            return recipe_store(job.recipe, job.passes, job.info, model, sweep.adapter, job.dtype, job.progress,
                                job.echo, first_block_only=True,
                                before_capture=lambda: hint_block_batch(job.recipe, job.info, len(sweep.names),
                                                                        job.echo))

    def compress(self, job, store):
        self.block_records = self.sweep.run(store)
        return block_records(self.block_records)

    def write(self, job, manifest, make_report):
        written = {}

        def finish(tmp):
            model = load(tmp, device=job.device, torch_dtype=job.dtype) if job.evaluates else self.sweep.model
            report = make_report(model, job.teacher() if job.evaluates else None)
            report.streaming = {**streaming_section(self.block_records), "enabled": True,
                                "propagate": job.recipe.streaming.propagate}
            written["report"] = report
            return report.to_dict(), artifact_files(self.sweep.state.files, report, job.recipe, job.info)

        check = LoadCheck(self.sweep.probes(), dtype=job.dtype, device=job.device)
        write_artifact_from_shards(self.sweep.model, self.sweep.shards(), job.out, manifest=manifest,
                                   source=job.source, finish=finish, overwrite=job.recipe.overwrite, check=check,
                                   pipeline=job.layout)
        written["report"].sections["load_check"] = check.result
        return written["report"]
