"""The streaming pipeline: compress a checkpoint block by block, holding one block's weights at a time.

    skeleton on the meta device  ->  embedders and output head loaded (small)
    calibration: the model's inputs and the first block's, captured with each block read only while it runs
    for each block:  read its weights -> run it over its inputs (linear statistics; with `propagate: original`
                     its outputs become the next block's inputs) -> every pass on this block alone
                     (`state.scope`) -> (`propagate: compressed`: the compressed block's outputs become the next
                     block's inputs) -> its tensors written as one shard -> released
    the shards become the artifact (config + manifest + index), written atomically as the in-memory path's.

Passes run block by block must be `streamable` (smooth, ars, tlq, rtn, act_quant). With `propagate: original`
every block sees exactly the inputs the whole-model capture gives it, and the artifact's tensors and
manifest equal the in-memory run's bit for bit (tests/test_streaming.py). A killed run resumes from its
finished blocks (`journal.py`).
"""
from __future__ import annotations

import ctypes
import os
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import adapter_for
from ..errors import DicompressError, RecipeError
from ..io.load_check import Probe, load_probes, save_probes
from ..io.manifest import replay
from ..io.storage import round_parameters, stored_state_dict
from ..passes.base import select_layers
from ..probes import block_probe
from ..records import PassRecord
from ..report import attach_activation_stats
from ..runner import run_passes
from ..state import CompressionState
from .blockdata import BlockCalibration, BlockInputs, run_over, stored_inputs
from .checkpoint import Checkpoint, offloaded, release, skeleton
from .journal import ROOT, Journal


def check_streamable(passes, enabled) -> bool:
    """Whether the run streams: `enabled` true / false, or "auto" = when every pass can (and the run is on one
    process). `enabled: true` with a pass that cannot stream is a recipe error naming it."""
    blocking = [f"passes[{i}].{p.name}" for i, p in enumerate(passes) if not p.streamable]
    if enabled is True:
        if blocking:
            raise RecipeError(f"streaming compresses one block at a time, but {', '.join(blocking)} needs the whole "
                              "model (it changes depth, trains, or reads several blocks at once)",
                              key="streaming.enabled",
                              hint="set `streaming: {enabled: false}` (or auto), or run those passes in a "
                                   "separate recipe")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RecipeError("streaming runs on one process; it has nothing to share across torchrun ranks",
                              key="streaming.enabled", hint="run it without torchrun")
        return True
    if enabled == "auto":
        return not blocking and int(os.environ.get("WORLD_SIZE", "1")) <= 1
    return False


def _check_selection(state, passes) -> None:
    """Every pass's include / keep patterns select something in the whole model (checked on the skeleton before
    any weight is read; block by block an empty selection is normal)."""
    for p in passes:
        if hasattr(p.config, "include"):
            select_layers(state, p.name, p.config.include, p.config.keep)


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed small-chunk memory otherwise, and a block's
    worth of fragments would count against the next block)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to do
        pass


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux reports KiB


class Sweep:
    """One streaming run over `info`'s checkpoint; `run()` compresses every block and returns the finished
    blocks' records (per pass: manifest entries, report rows, seconds)."""

    def __init__(self, info, passes, *, dtype, device, work_dir: Path, key: str, propagate: str,
                 progress: bool = True, save_dtype: torch.dtype | None = None):
        self.info, self.passes, self.dtype, self.device = info, passes, dtype, device
        self.save_dtype = save_dtype
        self.propagate, self.progress = propagate, progress
        self.checkpoint = Checkpoint(info.path)
        self.model = skeleton(info.class_name, info.path)
        self.adapter = adapter_for(self.model)
        self.blocks = self.adapter.blocks(self.model)
        self.names = [b.name for b in self.blocks]
        self.checkpoint.load_root(self.model, self.names, dtype, device)
        self.journal = Journal(Path(work_dir) / "stream", key)
        self.state = CompressionState(model=self.model, adapter=self.adapter, device=device, progress=False,
                                      work_dir=Path(work_dir), recipe_hash=key)
        _check_selection(self.state, passes)

    def capture_model(self):
        """The skeleton with its blocks read from the checkpoint only while each runs (calibration's loop)."""
        return offloaded(self.model, self.names, self.checkpoint, self.dtype, self.device)

    def run(self, store) -> list[dict]:
        j = self.journal
        if not j.shard(ROOT).exists():
            j.write_tensors(ROOT, {k: v for k, v in stored_state_dict(self.model, self.save_dtype).items()
                                   if not any(k.startswith(b + ".") for b in self.names)})
        release(self.model)              # the embedders and head are in their shard; only shapes are needed now
        records: list[dict] = []
        bar = tqdm(self.blocks, desc="streaming", unit="block", disable=not self.progress)
        for b, ref in enumerate(bar):
            done = j.record(ref.name)
            if done is not None:
                self._replay(done)
                j.drop_acts(ref.name)
                records.append({**done, "resumed": True})
                continue
            bar.set_postfix_str(ref.name)
            records.append(self._compress(b, ref, store))
            trim_heap()
            bar.set_postfix_str(f"{ref.name} {records[-1]['seconds']:.1f}s peak {_peak_rss() / 2**30:.2f} GiB")
        return records

    def _inputs(self, b: int, store) -> BlockInputs:
        if b == 0:
            return BlockInputs(*store.block_files(self.names[0]))
        got = stored_inputs(self.journal.acts(self.names[b]))
        if got is None:
            raise DicompressError(f"the streaming work directory {self.journal.root} has no inputs for block "
                                  f"{self.names[b]} although the block before it finished",
                                  hint=f"delete {self.journal.root.parent} and run again")
        return got

    def _compress(self, b: int, ref, store) -> dict:
        t0 = time.perf_counter()
        st, name = self.state, ref.name
        block = self.checkpoint.load_module(self.model, name, self.dtype, self.device)
        last = b + 1 == len(self.names)
        nxt = None if last else self.journal.acts(self.names[b + 1])
        if store is not None:
            inputs = self._inputs(b, store)
            stats = run_over(block, self.adapter, name, inputs,
                             next_dir=nxt if self.propagate == "original" else None)
            st.calibration = BlockCalibration(store.meta, name, inputs, stats)
        records = run_passes(st, self.passes, scope=(name,))
        if self.save_dtype is not None:     # the values the artifact holds (and, `compressed`, propagates)
            round_parameters(self.model.get_submodule(name), self.save_dtype)
        if store is not None:
            if b == 0 or last:            # what the write-time check reruns on the artifact as loaded
                probe = block_probe(block, name, self.adapter, inputs, self.device, self.dtype)
                if probe is not None:
                    save_probes(self.journal.probe(name), [probe])
            stats = st.calibration.linear_stats()
            for rec in records:
                attach_activation_stats(rec.layers, stats)
            if self.propagate == "compressed" and nxt is not None:
                run_over(block, self.adapter, name, inputs, next_dir=nxt, stats=False)
        record = {"block": name, "stream": ref.stream, "passes": [r.to_json() for r in records],
                  "seconds": time.perf_counter() - t0, "peak_rss_bytes": _peak_rss()}
        tensors = stored_state_dict(self.model.get_submodule(name), self.save_dtype, prefix=name + ".")
        self.journal.finish_block(name, tensors, record)
        del tensors
        release(block)
        st.calibration, st.records, st.manifest = None, [], []
        if b > 0:
            self.journal.drop_acts(name)
        return record

    def _replay(self, record: dict) -> None:
        """A block finished by an earlier run: rebuild its modules on the meta device (footprint, config)."""
        replay(self.model, [e for p in record["passes"] for e in p["manifest"]], device="meta")

    def probes(self) -> list[Probe]:
        """The first and last blocks' probes (none for a run without calibration inputs)."""
        paths = [self.journal.probe(n) for n in dict.fromkeys([self.names[0], self.names[-1]])]
        return [p for path in paths if path.exists() for p in load_probes(path)]

    def shards(self) -> list[Path]:
        return [self.journal.shard(ROOT)] + [self.journal.shard(n) for n in self.names]


def block_records(records: list[dict]) -> list[PassRecord]:
    """Every block's pass records, in block order (what `records.combine` merges per pass)."""
    return [PassRecord.from_json(r) for rec in records for r in rec["passes"]]


def streaming_section(records: list[dict]) -> dict:
    """The report's `streaming` section: per block, its stream, seconds, peak RSS and whether it was resumed."""
    return {"blocks": [{"block": r["block"], "stream": r["stream"], "seconds": round(r["seconds"], 3),
                        "peak_rss_bytes": r.get("peak_rss_bytes"), "resumed": bool(r.get("resumed"))}
                       for r in records],
            "resumed_blocks": sum(bool(r.get("resumed")) for r in records)}
