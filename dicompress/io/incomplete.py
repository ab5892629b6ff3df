"""Directories being written: the writer's temp directories carry a marker file (`.dicompress-incomplete`, with
the writer's host and pid), written first and removed just before the rename into place. Readers refuse a
directory with the marker (unless this very process is writing it: a streaming write evaluates the artifact
from its temp directory); the next write to the same output removes those whose writer is dead."""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import ArtifactError
from .names import MARKER_NAME, TEMP_KINDS, temp_prefix

_WRITING: set[Path] = set()    # temp directories this process is writing now


def make_temp_dir(out: Path, kind: str) -> Path:
    """A hidden sibling of `out` named `.<out>.tmp-<kind>-XXXX`, its marker written first, with an artifact's
    normal permissions (0o777 minus the umask; mkdtemp makes 0o700)."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name, kind), dir=out.parent))
    marker = {"pid": os.getpid(), "host": socket.gethostname(), "output": out.name}
    (tmp / MARKER_NAME).write_text(json.dumps(marker) + "\n")
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


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
    """Remove the marker: the last step before the rename into place."""
    (tmp / MARKER_NAME).unlink()


def refuse_incomplete(root: Path) -> None:
    """ArtifactError if `root` holds a marker (an interrupted or running write) that is not this process's own."""
    if (root / MARKER_NAME).exists() and root.resolve() not in _WRITING:
        owner = _read_marker(root)
        alive = owner is not None and _alive(owner)
        who = f"process {owner['pid']} on {owner['host']}" if owner else "a writer"
        raise ArtifactError(
            f"{root} is an incomplete artifact: {who} {'is still writing it' if alive else 'was interrupted'} "
            f"({MARKER_NAME} present)",
            hint="wait for the write to finish" if alive else
            "an interrupted write left this; delete it (the next write to the same output also removes it)")


def remove_stale(out: Path) -> list[Path]:
    """Delete the temp directories of `out` left by dead writers on this host; returns what was removed.
    A directory without a readable marker, or whose writer may be alive, is left alone."""
    removed = []
    for kind in TEMP_KINDS:
        for d in out.parent.glob(temp_prefix(out.name, kind) + "*"):
            owner = _read_marker(d) if d.is_dir() else None
            if owner is not None and owner["host"] == socket.gethostname() and not _alive(owner):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


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
