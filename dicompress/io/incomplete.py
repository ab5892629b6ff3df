"""Directories being written: the writer's temp directories carry a marker file (`.dicompress-incomplete`, with
the writer's host and pid), written first and removed just before the rename into place; their config.json
carries the same identity (`quantization_config.incomplete`, dropped just before the marker), so diffusers'
own `from_pretrained` pointed at a temp directory refuses it too (the quantizer config's check). dicompress's
readers refuse a directory with the marker, and any directory named as a temp directory (`.<out>.tmp-<kind>-*`,
marked or not: a write killed between the unmark and the rename, or an old artifact moved aside), unless this very
process is writing it (a streaming write evaluates the artifact from its temp directory). The next write to the
same output, holding its lock, removes every temp directory of that output that no live writer owns.

In the pipeline layout the temp directory holds the artifact in `transformer/`, which carries its own marker and
`incomplete` config key while it is written: a reader refuses the pipeline directory, its transformer/, and any
directory whose parent is a marked or temp-named directory."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import ArtifactError
from .names import CONFIG_NAME, MARKER_NAME, PIPELINE_INDEX, TEMP_KINDS, TRANSFORMER_DIR, temp_prefix

CONFIG_KEY = "incomplete"      # quantization_config key of an artifact being written: its writer's identity
_WRITING: set[Path] = set()    # temp directories this process is writing now


def writer_identity() -> dict:
    """Who is writing: what the marker file holds, and what an unfinished config.json carries (`CONFIG_KEY`)."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def make_temp_dir(out: Path, kind: str) -> Path:
    """A hidden sibling of `out` named `.<out>.tmp-<kind>-XXXX`, its marker written first, with an artifact's
    normal permissions (0o777 minus the umask; mkdtemp makes 0o700)."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name, kind), dir=out.parent))
    _write_marker(tmp, out)
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def make_marked_dir(d: Path, out: Path) -> Path:
    """A new directory `d` inside a temp directory (the pipeline layout's transformer/), marked as it is."""
    d.mkdir()
    _write_marker(d, out)
    return d


def _write_marker(d: Path, out: Path) -> None:
    (d / MARKER_NAME).write_text(json.dumps({**writer_identity(), "output": out.name}) + "\n")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def writing(tmp: Path):
    """While inside, this process may read `tmp` despite its marker (to verify or evaluate what it wrote)."""
    key = tmp.resolve()
    _WRITING.add(key)
    try:
        yield tmp
    finally:
        _WRITING.discard(key)


def mark_complete(tmp: Path) -> None:
    """Drop config.json's `CONFIG_KEY` (where `tmp` has a config.json: not a pipeline directory's top), then the
    marker: the last steps before the rename into place."""
    cfg = tmp / CONFIG_NAME
    config = json.loads(cfg.read_text()) if cfg.is_file() else {}
    if config.get("quantization_config", {}).pop(CONFIG_KEY, None) is not None:
        part = cfg.with_name(CONFIG_NAME + ".part")
        with open(part, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, cfg)
    (tmp / MARKER_NAME).unlink()
    _fsync(tmp)


def _fsync(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_unfinished_config(owner) -> None:
    """ArtifactError for a config.json still carrying `CONFIG_KEY` (read by diffusers' `from_pretrained` straight
    from a temp directory, where no marker file is looked at), unless this process is the writer."""
    mine = (isinstance(owner, dict) and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
            and bool(_WRITING))
    if not mine:
        raise ArtifactError(
            f"this artifact's config.json is marked unfinished ({CONFIG_KEY}: {owner}): it is the temp directory of "
            "a write that is still running or was interrupted",
            hint="load the finished output directory instead; an interrupted write's temp directory can be deleted")


_TEMP_NAME = re.compile(r"^\.(?P<out>.+)\.tmp-(?:%s)-" % "|".join(TEMP_KINDS))


def temp_dir_output(d: Path) -> Path | None:
    """The output `d` is a writer's temp directory of, judged by its name; None for any other directory."""
    m = _TEMP_NAME.match(d.name)
    return d.with_name(m["out"]) if m else None


def refuse_incomplete(root: Path) -> None:
    """ArtifactError if `root` holds a marker (an interrupted or running write) that is not this process's own,
    or is named as a writer's temp directory; the same for its parent (a pipeline-layout temp directory's
    transformer/ is refused even once it is unmarked itself)."""
    resolved = root.resolve()
    if resolved in _WRITING:
        return
    _refuse_marked_or_temp(root, resolved)
    if resolved.parent not in _WRITING:
        _refuse_marked_or_temp(resolved.parent, resolved.parent)


def _refuse_marked_or_temp(root: Path, resolved: Path) -> None:
    out = temp_dir_output(resolved)
    if out is not None and not (root / MARKER_NAME).exists():
        raise ArtifactError(
            f"{root} is the temp directory of a dicompress write to {out}, not an artifact: its write was "
            "interrupted between the last check and the rename, or it is an old artifact moved aside",
            hint=f"load {out}; the next write to it removes this directory (or delete it)")
    if (root / MARKER_NAME).exists():
        owner = _read_marker(root)
        alive = owner is not None and _alive(owner)
        who = f"process {owner['pid']} on {owner['host']}" if owner else "a writer"
        raise ArtifactError(
            f"{root} is an incomplete artifact: {who} {'is still writing it' if alive else 'was interrupted'} "
            f"({MARKER_NAME} present)",
            hint="wait for the write to finish" if alive else
            "an interrupted write left this; delete it (the next write to the same output also removes it)")


def remove_stale(out: Path) -> list[Path]:
    """Delete the temp directories of `out` that no live writer owns; returns what was removed. Call it holding
    `out`'s run lock (runlock.py), which no other writer of `out` can hold meanwhile: then an unmarked one is a
    dead write's (killed between its unmark and rename, or an old artifact it moved aside). A marked one is kept
    while its writer may be alive (another host's is always assumed to be)."""
    removed = []
    for kind in TEMP_KINDS:
        for d in out.parent.glob(temp_prefix(out.name, kind) + "*"):
            if not d.is_dir():
                continue
            owner = _read_marker(d)
            if (d / MARKER_NAME).exists() and (owner is None or _alive(owner)):
                continue
            discard(d)
            removed.append(d)
    return removed


def discard(d: Path) -> None:
    """Delete an artifact directory so that it stops loading first: model_index.json and config.json (a pipeline
    layout's transformer/config.json) go before the rest (a kill during the tree removal leaves nothing diffusers
    would load). Hard-linked files are unlinked: the source's copies stay."""
    for first in (PIPELINE_INDEX, CONFIG_NAME, f"{TRANSFORMER_DIR}/{CONFIG_NAME}"):
        try:
            (d / first).unlink()
        except OSError:
            pass
    shutil.rmtree(d, ignore_errors=True)


def _read_marker(d: Path) -> dict | None:
    try:
        owner = json.loads((d / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str)
    return owner if ok else None


def _alive(owner: dict) -> bool:
    """Whether the marker's writer may still run (always assumed for another host: its pids mean nothing here)."""
    if owner["host"] != socket.gethostname():
        return True
    if owner["pid"] == os.getpid():
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # someone else's live process
        return True
    return True
