"""A complete pipeline directory as output: the source pipeline's components (all but the transformer) placed
beside the artifact, file by file, hard-linked (or copied), never re-encoded; the writer (writer.py) calls
`place_components` inside its temp directory once the artifact in transformer/ is verified."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from .names import PIPELINE_INDEX, TRANSFORMER_DIR


@dataclass
class PipelineOutput:
    """Write the artifact as `transformer/` of a complete pipeline directory: beside it `source`'s model_index.json
    (copied unchanged) and its other components, hard-linked file by file (`copy`: copied), never re-encoded. The
    writer sets `result` (what was placed: the report's `pipeline_output`)."""
    source: Path
    copy: bool = False
    result: dict | None = None


def pipeline_components(root: Path) -> list[str]:
    """The component folders `root`'s model_index.json names (non-null entries), the transformer excepted;
    ModelError when the index is unreadable or a folder it names is missing."""
    index = Path(root) / PIPELINE_INDEX
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{index} is unreadable: {e}", hint="the pipeline directory is damaged; download it again") \
            from None
    if not isinstance(entries, dict):
        raise ModelError(f"{index} is not a diffusers pipeline index (a JSON mapping)", hint="download it again")
    names = [k for k, v in entries.items() if not k.startswith("_") and k != TRANSFORMER_DIR
             and isinstance(v, list) and v and v[0] is not None]
    missing = [n for n in names if not (Path(root) / n).is_dir()]
    if missing:
        raise ModelError(f"{root}: model_index.json names components without a folder: {', '.join(missing)}",
                         hint="the pipeline directory is incomplete; download it again, or set "
                              "`output_layout: transformer` to write the transformer alone")
    return names


def place_components(pipeline: PipelineOutput, tmp: Path) -> dict:
    """The source pipeline's components but the transformer into `tmp`, file by file: hard links to the real files
    (symlinks followed, as a hub snapshot's point into its blob store), a copy where linking fails (another file
    system) or `pipeline.copy` asks; hidden files are left out. model_index.json is copied last: until then the
    temp directory is no pipeline. Returns what was placed, for the report."""
    src = Path(pipeline.source)
    placed = {"source": str(src), "mode": "copy" if pipeline.copy else "link", "components": {}, "linked": 0,
              "copied": 0, "bytes": 0}
    for name in pipeline_components(src):
        files = 0
        for dirpath, dirnames, filenames in os.walk(src / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(src)
            (tmp / rel).mkdir(exist_ok=True)
            for fname in sorted(f for f in filenames if not f.startswith(".")):
                real = Path(os.path.realpath(Path(dirpath) / fname))
                how = _link_or_copy_file(real, tmp / rel / fname, pipeline.copy)
                placed[how] += 1
                placed["bytes"] += real.stat().st_size
                files += 1
        placed["components"][name] = files
    shutil.copyfile(src / PIPELINE_INDEX, tmp / PIPELINE_INDEX)
    return placed


def _link_or_copy_file(src: Path, dst: Path, copy: bool) -> str:
    """Hard-link `src` at `dst` unless `copy`; a copy (contents and mode) where the link fails. Returns "linked" or
    "copied"."""
    if not copy:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:          # EXDEV (another file system), EPERM (protected_hardlinks), EMLINK ...
            pass
    shutil.copy2(src, dst)
    return "copied"
