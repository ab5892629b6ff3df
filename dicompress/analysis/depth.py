"""Block analysis for depth pruning, from the calibration store's captured block inputs.

Per stream (image = hidden_states, text = encoder_hidden_states), with outputs of block i = inputs of block
i + 1 (the last block's: the captured final outputs):
- PPCL similarity: linear CKA(input_i, output_i) along depth, and its first-order difference (aligned with
  the blocks; the first is 0). High CKA and a flat trajectory mark a redundant region.
- PPCL probes: for every candidate interval [s, e] (2..max_interval blocks, within one block list), the
  held-out error of the best affine map input(s) -> output(e); scored per removed block (intervals.py).
- Amber importance: skip block l (block l + 1 gets block l's captured input), run the rest of the chain with
  the model's own blocks, apply the output head; importance = relative MSE against the head on the captured
  final outputs, per equal-count timestep bin, and the mean over bins. `baseline` is the same error with no
  block skipped (0 up to float error unless earlier passes changed the model).

CKA and probes use `max_tokens` (row, token) pairs per stream drawn once with a fixed seed and kept across
depth; blocks are read from the store one at a time (the probes keep `max_interval` subsampled blocks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import pairwise

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..calib.encoding import to_module
from ..errors import CalibrationError
from .intervals import candidate_intervals, interval_score, select_intervals
from .plot import plot_depth
from .similarity import linear_cka, probe_error

STREAMS = {"hidden_states": "image", "encoder_hidden_states": "text"}   # block input name -> stream

__all__ = ["STREAMS", "DepthAnalysis", "analyze_depth", "bin_by_timestep", "interval_label", "plot_depth",
           "select_intervals"]


@dataclass
class DepthAnalysis:
    blocks: list[str]                       # run order
    streams: list[str]                      # e.g. ["image", "text"]
    cka: dict[str, list[float]]             # stream -> CKA(input_i, output_i) per block
    cka_diff: dict[str, list[float]]        # stream -> cka[i] - cka[i - 1] (0 for the first block)
    intervals: list[dict]                   # ranked, most removable (lowest score) first
    timestep_bins: list[tuple[float, float]]
    importance: list[dict]                  # block order: {"block", "per_bin", "importance"}
    baseline: list[float] = field(default_factory=list)   # per bin: relative error with nothing skipped
    rows: int = 0                           # calibration rows the importance was measured on

    def ranked_blocks(self) -> list[str]:
        """Least important first."""
        return [r["block"] for r in sorted(self.importance, key=lambda r: r["importance"])]

    def to_report(self) -> dict:
        rep = asdict(self)
        rep["timestep_bins"] = [list(b) for b in self.timestep_bins]
        rep["ranked_blocks"] = self.ranked_blocks()
        return rep

    @classmethod
    def from_report(cls, rep: dict) -> DepthAnalysis:
        """Inverse of `to_report` (later passes read the analysis back from `state.report`)."""
        keys = cls.__dataclass_fields__
        kw = {k: v for k, v in rep.items() if k in keys}
        kw["timestep_bins"] = [tuple(b) for b in rep["timestep_bins"]]
        return cls(**kw)


# -- reading the store -------------------------------------------------------------------------------
def _state_keys(inputs: dict) -> list[str]:
    return [k for k in STREAMS if isinstance(inputs.get(k), Tensor)]


def _take_rows(value, rows):
    if isinstance(value, Tensor):
        return value[rows]
    return tuple(_take_rows(v, rows) for v in value)


def _same(a, b) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def _load_contexts(store, adapter, blocks: list[str], states: list[str], progress: bool) -> list[dict]:
    """Each block's non-state inputs (temb, rotary embeddings, masks). Equal tensors are shared between
    blocks (FLUX and Qwen-Image feed every block the same ones), so this costs about one block's worth."""
    keys = [k for k in adapter.per_sample_inputs if k not in states]
    out: list[dict] = []
    for name in tqdm(blocks, desc="depth: contexts", unit="block", disable=not progress):
        ctx = {k: v for k, v in store.block_inputs(name, keys=keys).items() if k not in states and k != "timestep"}
        if out:
            ctx = {k: out[-1][k] if k in out[-1] and _same(v, out[-1][k]) else v for k, v in ctx.items()}
        out.append(ctx)
    return out


def _token_index(shape: torch.Size, max_tokens: int, gen: torch.Generator) -> Tensor:
    total = shape[0] * shape[1]
    if total <= max_tokens:
        return torch.arange(total)
    return torch.randperm(total, generator=gen)[:max_tokens].sort().values


def _subsample(inputs: dict, index: dict[str, Tensor]) -> dict[str, Tensor]:
    return {STREAMS[k]: inputs[k].reshape(-1, inputs[k].shape[-1])[idx].double() for k, idx in index.items()}


def bin_by_timestep(timestep: Tensor, n_bins: int) -> tuple[list[Tensor], list[tuple[float, float]]]:
    """Equal-count bins of the rows by timestep: (row indices per bin, (min, max) timestep per bin)."""
    n_bins = max(1, min(n_bins, timestep.numel()))
    order = torch.sort(timestep, stable=True).indices
    groups = list(torch.tensor_split(order, n_bins))
    return groups, [(float(timestep[g].min()), float(timestep[g].max())) for g in groups]


# -- the Amber ablation ----------------------------------------------------------------------------------
class _Ablation:
    """Runs chains of the model's blocks from captured states and accumulates the head-output error."""

    def __init__(self, model, adapter, names: list[str], contexts: list[dict], final: dict, per_sample: set[str],
                 batch_size: int):
        self.model, self.adapter, self.names, self.contexts = model, adapter, names, contexts
        self.final, self.per_sample, self.batch_size = final, per_sample, batch_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def _ctx(self, j: int, rows: Tensor) -> dict:
        return {k: (_take_rows(v, rows) if k in self.per_sample else v) for k, v in self.contexts[j].items()}

    def _to(self, d: dict) -> dict:
        return to_module(d, self.device, self.dtype)

    def _head(self, hidden: Tensor, rows: Tensor) -> Tensor:
        temb = self._ctx(len(self.names) - 1, rows)["temb"]
        return self.adapter.output_head(self.model, hidden, self._to({"t": temb})["t"]).double()

    @torch.no_grad()
    def errors(self, states: dict[str, Tensor], first: int) -> tuple[Tensor, Tensor]:
        """Run blocks first..L-1 from `states` (all rows); per row: squared error and reference energy."""
        n = next(iter(states.values())).shape[0]
        err, ref = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for rows in torch.arange(n).split(self.batch_size):
            h = self._to({k: v[rows] for k, v in states.items()})
            for j in range(first, len(self.names)):
                block = self.model.get_submodule(self.names[j])
                h = self.adapter.run_block(block, {**self._to(self._ctx(j, rows)), **h})
            out = self._head(h["hidden_states"], rows)
            target = self._head(self._to({"h": self.final["hidden_states"][rows]})["h"], rows)
            err[rows] = (out - target).pow(2).flatten(1).sum(1).cpu()
            ref[rows] = target.pow(2).flatten(1).sum(1).cpu()
        return err, ref


def _per_bin(err: Tensor, ref: Tensor, groups: list[Tensor]) -> list[float]:
    return [float(err[g].sum() / ref[g].sum().clamp_min(1e-30)) for g in groups]


# -- the analysis --------------------------------------------------------------------------------------
def _check_store(store, names: list[str]) -> None:
    if not store.has_block_inputs:
        raise CalibrationError("depth analysis needs captured block inputs; this store holds statistics only",
                               hint="capture calibration with block inputs (a pass that declares "
                                    "needs_block_inputs in the recipe does this, or calibration.block_inputs: true)")
    if store.block_names and list(store.block_names) != names:
        raise CalibrationError(f"the calibration store's blocks ({len(store.block_names)}) are not this model's "
                               f"({len(names)})", hint="capture calibration again with this model")


def _probe_intervals(cands, subs: dict[int, dict], out_sub: dict, end: int, streams, holdout) -> list[dict]:
    """Probe every candidate ending at block `end` (its output is `out_sub`)."""
    found = []
    for s, e in cands:
        if e != end:
            continue
        err = {st: probe_error(subs[s][st], out_sub[st], holdout=holdout) for st in streams}
        cka = {st: linear_cka(subs[s][st], out_sub[st]) for st in streams}
        err["combined"] = sum(err.values()) / len(streams)
        cka["combined"] = sum(cka.values()) / len(streams)
        found.append({"start": s, "end": e, "removed": e - s, "probe_error": err, "cka": cka,
                      "score": interval_score(err["combined"], s, e)})
    return found


def analyze_depth(model, adapter, store, *, max_interval: int = 4, timestep_bins: int = 4, max_tokens: int = 4096,
                  progress: bool = True, batch_size: int = 64, probe_holdout: float = 0.25,
                  seed: int = 0) -> DepthAnalysis:
    """CKA trajectory, interval probes and skip-one importance of every block (see the module docstring)."""
    names = [b.name for b in adapter.blocks(model)]
    _check_store(store, names)
    cands = candidate_intervals(names, max_interval)
    first = store.block_inputs(names[0])
    states = _state_keys(first)
    streams = [STREAMS[k] for k in states]
    contexts = _load_contexts(store, adapter, names, states, progress)
    final = store.final_outputs()
    groups, bins = _bins_of(first, timestep_bins)
    gen = torch.Generator().manual_seed(seed)
    index = {k: _token_index(first[k].shape, max_tokens, gen) for k in states}
    ablation = _Ablation(model, adapter, names, contexts, final, set(adapter.per_sample_inputs), batch_size)
    was_training = model.training
    model.eval()
    try:
        baseline = _per_bin(*ablation.errors({k: first[k] for k in states}, 0), groups)
        rows, inputs = int(first["timestep"].numel()), first
        del first                                   # `inputs` moves on block by block
        cka: dict[str, list[float]] = {st: [] for st in streams}
        intervals, importance, subs = [], [], {}
        for i, name in enumerate(tqdm(names, desc="depth: blocks", unit="block", disable=not progress)):
            nxt = store.block_inputs(names[i + 1]) if i + 1 < len(names) else final
            subs[i], out_sub = _subsample(inputs, index), _subsample(nxt, index)
            for st in streams:
                cka[st].append(linear_cka(subs[i][st], out_sub[st]))
            intervals += _probe_intervals(cands, subs, out_sub, i, streams, probe_holdout)
            subs.pop(i - max_interval + 1, None)    # no candidate starting there ends later
            per_bin = _per_bin(*ablation.errors({k: inputs[k] for k in states}, i + 1), groups)
            importance.append({"block": name, "per_bin": per_bin, "importance": sum(per_bin) / len(per_bin)})
            inputs = nxt
    finally:
        model.train(was_training)

    for iv in intervals:
        iv["first"], iv["last"] = names[iv["start"]], names[iv["end"]]
        iv["importance"] = sum(importance[j]["importance"] for j in range(iv["start"], iv["end"] + 1))
    intervals.sort(key=lambda iv: (iv["score"], iv["start"], iv["end"]))
    diff = {st: [0.0] + [b - a for a, b in pairwise(v)] for st, v in cka.items()}
    return DepthAnalysis(blocks=names, streams=streams, cka=cka, cka_diff=diff, intervals=intervals,
                         timestep_bins=bins, importance=importance, baseline=baseline, rows=rows)


def _bins_of(inputs: dict, n_bins: int):
    if "timestep" not in inputs:
        raise CalibrationError("the captured block inputs carry no timestep", hint="capture calibration again")
    return bin_by_timestep(inputs["timestep"].float(), n_bins)


def interval_label(iv: dict) -> str:
    """"transformer_blocks.1-3" for an interval of the analysis (intervals never cross block lists)."""
    return f"{iv['first']}-{iv['end'] - iv['start'] + int(iv['first'].rsplit('.', 1)[1])}"
