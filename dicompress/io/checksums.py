"""SHA-256 of an artifact's files: recorded in config.json (`quantization_config.checksums`, {file name: hex})
when the artifact is written, checked by `dicompress verify`, `inspect --verify` and `load(..., verify=True)`.

Hashing reads each file once (about 0.8 s per GiB here; see the README); where the writer produces the bytes
itself (extra files, copied shards, `save_aligned_safetensors`) the digest is taken as they are written instead.
config.json cannot hold its own digest and report.json is informational: neither is covered.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..errors import ArtifactError
from .names import CONFIG_NAME, MARKER_NAME, REPORT_NAME

CHUNK = 1 << 20
UNCOVERED = {CONFIG_NAME, REPORT_NAME, MARKER_NAME}


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def copy_with_sha256(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Copy `src` to `dst`, hashing the bytes on the way; returns the hex SHA-256."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
    shutil.copymode(src, dst)
    return h.hexdigest()


def covered_files(root: Path) -> list[str]:
    """The files of an artifact directory its checksums cover: all but config.json, report.json and the marker."""
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.name not in UNCOVERED)


def complete_checksums(root: Path, known: dict[str, str]) -> dict[str, str]:
    """{file: hex} for every covered file of `root`: the digests taken while writing (`known`), the others hashed
    from the freshly written files (diffusers' `save_pretrained` shards, hard-linked streaming shards)."""
    return {name: known.get(name) or sha256_file(root / name) for name in covered_files(root)}


def check_checksums(root: Path, recorded: dict, weight_files: list[str]) -> dict:
    """Re-hash every file `recorded` names and compare; raises ArtifactError naming each file that differs, is
    missing, or is a weight shard without a recorded digest. Returns {files, bytes}."""
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise ArtifactError(f"{root / CONFIG_NAME}: quantization_config.checksums is not a {{file: sha256}} map",
                            hint=f"{CONFIG_NAME} was edited or damaged; re-run the compression")
    problems, total = [], 0
    for name in sorted(set(weight_files) - set(recorded)):
        problems.append(f"{name} has no recorded checksum")
    for name, want in sorted(recorded.items()):
        path = root / name
        if Path(name).name != name or not path.is_file():
            problems.append(f"{name} is missing")
            continue
        total += path.stat().st_size
        if sha256_file(path) != want.lower():
            problems.append(f"{name} differs from its recorded SHA-256")
    if problems:
        raise ArtifactError(f"{root}: " + "; ".join(problems),
                            hint="the file was changed or damaged after it was written (disk, copy, edit); copy "
                                 "the artifact again from a good source or re-run the compression")
    return {"files": len(recorded), "bytes": total}
