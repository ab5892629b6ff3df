"""What one pass did in one scope, as a typed record, and how a run's records combine.

The runner (`runner.run_passes`) makes one `PassRecord` per pass and scope: the whole model is one scope, a
streamed run has one scope per block. Passes fill the record through the state (`state.record` for
manifest entries, `state.add_pass_report` for the summary and per-layer rows, `state.add_section` for a
report section such as the depth analysis); nothing else edits a report. `combine` turns a run's records
into the manifest and the report's `passes` / `layers` lists, the same way for both paths.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import RecipeError


@dataclass
class PassRecord:
    index: int                                  # position of the pass in the recipe
    name: str                                   # its registered name
    config: dict                                # its validated config (JSON)
    scope: str | None = None                    # None: the whole model; else the one block it ran on
    manifest: list[dict] = field(default_factory=list)    # changes to replay at load time, in order
    layers: list[dict] = field(default_factory=list)      # per-layer report rows
    summary: dict | None = None                 # the pass's summary (None: it reported none)
    sections: dict[str, Any] = field(default_factory=dict)  # report sections it adds (e.g. depth_analysis)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PassRecord":
        return cls(**data)


def passes_digest(passes) -> str:
    """16 hex digits of the passes' names and configs: what a checkpoint or a per-stage capture was made under."""
    blob = json.dumps([{p.name: p.config.model_dump(mode="json")} for p in passes], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pass_entry(name: str, summary: dict | None, seconds: float, config: dict) -> dict:
    """One pass's row of the report's `passes` list."""
    return {"pass": name, **(summary or {}), "seconds": round(seconds, 3), "config": config}


def _per_pass(records: list[PassRecord]) -> dict[int, list[PassRecord]]:
    by_index: dict[int, list[PassRecord]] = {}
    for r in records:
        by_index.setdefault(r.index, []).append(r)
    return dict(sorted(by_index.items()))


def pass_summary(p, recs: list[PassRecord]) -> dict:
    """One pass's report entry from its records: its own summary when it ran on the whole model, else its
    `summarize` over the rows of every scope (as the whole-model run would have summarised them)."""
    rows = [row for r in recs for row in r.layers]
    if any(r.scope is not None for r in recs):
        if not rows:
            raise RecipeError(f"{p.name} changed no layer of the model", key=f"passes[{recs[0].index}].{p.name}",
                              hint="check its include / keep patterns")
        summary = p.summarize(rows)
    else:
        summary = recs[-1].summary
    return pass_entry(p.name, summary, sum(r.seconds for r in recs), recs[0].config)


def combine(passes, records: list[PassRecord]) -> tuple[list[dict], dict]:
    """(manifest, report part) of a run: per pass in recipe order, its scopes' manifest entries and rows in
    scope order (what the whole-model run records, since each pass walks the blocks in order), one summary
    per pass, and the sections passes added. `passes` are the Pass objects the records index."""
    manifest: list[dict] = []
    report: dict[str, Any] = {"passes": [], "layers": []}
    for i, recs in _per_pass(records).items():
        manifest += [e for r in recs for e in r.manifest]
        report["passes"].append(pass_summary(passes[i], recs))
        report["layers"] += [row for r in recs for row in r.layers]
        for r in recs:
            report.update(r.sections)
    return manifest, report
