"""One run per output: `<output>.lock` beside the output, held (fcntl.flock) while a run writes it.

flock locks belong to the open file: the kernel drops them when the owning process exits, however it exits,
so a lock left by a killed run is stale by construction and the next run simply takes it. The file holds the
owner's pid (for the message a second run prints) and is removed when the run ends. A process that holds
the lock may take it again (the artifact writer takes it for callers of the Python API that did not).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import ArtifactError

_HELD: set[str] = set()        # lock files this process holds (real paths)


def lock_path(output: str | Path) -> Path:
    out = Path(output)
    return out.with_name(out.name + ".lock")


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def _acquire(path: Path, output: Path) -> int:
    """The locked file's descriptor; raises when another live process holds it."""
    for _ in range(10):
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArtifactError(f"another dicompress run (pid {_owner(path)}) is writing {output}",
                                hint="wait for it to finish, or choose another --output") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:      # not a file its previous owner removed after we opened it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise ArtifactError(f"could not take the lock {path}", hint="another run keeps replacing it; try again")


@contextmanager
def output_lock(output: str | Path, take: bool = True):
    """Hold `<output>.lock` for the block (nothing when `take` is false: torchrun's ranks other than 0)."""
    output = Path(output)
    path = lock_path(output)
    key = os.path.realpath(path)
    if not take or key in _HELD:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, output)
    except OSError as e:
        raise ArtifactError(f"cannot write beside the output {output}: {e.strerror or e}",
                            hint=f"choose an --output in a directory you can write ({path.parent} is not "
                                 "writable here)") from None
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)
