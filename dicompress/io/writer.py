"""Writing an artifact: everything goes into a hidden sibling temp directory (`.<name>.tmp-incomplete-XXXX/`, with a
`.dicompress-incomplete` marker naming the writer's pid), is checksummed, fsynced and verified, and only then
renamed into place (over an old artifact: exchanged with it in one step, where the OS can), so a crash at any
point leaves the output absent, the old artifact, or the new one complete; what else it leaves is a temp
directory that dicompress refuses to load and the next write to that output removes. An OSError on the way
(a full disk, a read-only file system) becomes an ArtifactError (exit 3) naming the output and the file.

The SHA-256 of every file but config.json and report.json goes into config.json (`quantization_config.checksums`):
taken as the bytes are written where the writer writes them (extra files, copied shards), else read back from the
freshly written temp file before the rename (the shards diffusers' `save_pretrained` writes on the in-memory path;
hard-linked streaming shards).

With `pipeline` (a `PipelineOutput`, pipeline_output.py: the model was a diffusers pipeline directory) the output is
a complete pipeline: the artifact is written, checksummed, verified and load-checked in `tmp/transformer/` (marked
itself), then the source's other components are hard-linked (or copied) in file by file and its model_index.json
copied, and the whole tree is fsynced, unmarked (transformer/, then the top) and renamed into place as one
directory."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ModelError
from ..runlock import output_lock
from .checksums import complete_checksums, copy_with_sha256, sha256_file
from .incomplete import (CONFIG_KEY, discard, make_marked_dir, make_temp_dir, mark_complete, remove_stale,
                         writer_identity, writing)
from .load_check import LoadCheck
from .pipeline_output import PipelineOutput, place_components
from .manifest import FORMAT_VERSION, dicompress_version
from .names import (CONFIG_NAME, INDEX_NAME, REPORT_NAME, TRANSFORMER_DIR, WEIGHTS_NAME,
                    WEIGHTS_PREFIX, shard_name)
from .safetensors_file import read_safetensors_header
from .storage import parameters_stored_as
from .verify import verify_artifact

DEFAULT_SHARD_SIZE = "5GB"
_RESERVED = {CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME, INDEX_NAME}


def write_artifact(model: nn.Module, out_dir: str | os.PathLike, *, manifest: list[dict], report: dict,
                   source: dict, files: dict[str, bytes] | None = None, overwrite: bool = False,
                   max_shard_size: int | str = DEFAULT_SHARD_SIZE, save_dtype: torch.dtype | None = None,
                   check: LoadCheck | None = None, pipeline: PipelineOutput | None = None) -> Path:
    """Write `model` (already rewritten in place) as a dicompress artifact at `out_dir`; floating parameters
    are stored as `save_dtype` (None: as they are; see `storage.py`).

    Everything goes into a hidden sibling temp directory, is checksummed, fsynced and verified, and only then
    renamed into place: a crash at any point leaves `out_dir` absent (or, when overwriting, the old
    artifact intact). The weight shards are written by diffusers' `save_pretrained`, so their SHA-256 is read
    back from the temp files before the rename. With `check`, the temp directory is first loaded as users load
    it and must reproduce `check.probes` (load_check.py). With `pipeline`, `out_dir` becomes a complete pipeline
    directory whose transformer/ is the artifact. Returns `out_dir`.
    """
    out = _check_out(model, out_dir, overwrite)
    extra = _check_extra_files(files or {})
    quant_config = _quant_config(manifest, source)

    def fill(tmp: Path, sums: dict[str, str]) -> dict:
        for name, data in extra.items():
            _write_bytes(tmp / name, data, sums)
        with parameters_stored_as(model, save_dtype):
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        # Last: until config.json carries the manifest, the directory is not a dicompress artifact.
        _add_quantization_config(tmp / CONFIG_NAME, quant_config)
        return report

    return _write_atomically(out, fill, check, pipeline)


def write_artifact_from_shards(config_model: nn.Module, shards: list[Path], out_dir: str | os.PathLike, *,
                               manifest: list[dict], source: dict, finish, overwrite: bool = False,
                               check: LoadCheck | None = None, pipeline: PipelineOutput | None = None) -> Path:
    """Write an artifact whose weights are already safetensors files (the streaming pipeline's finished
    blocks): they become the artifact's shards (hard-linked when on the same file system, hashed once then;
    else copied, hashed while copying), with the index, and `config_model`'s config (+ the manifest).
    `finish(tmp_dir) -> (report, files)` runs once weights and config are in place (it may load the artifact
    from there despite its incomplete marker, e.g. to evaluate it; with `pipeline` it is the temp directory's
    transformer/); then, as `write_artifact`, everything is checksummed, fsynced, verified and renamed into place."""
    out = _check_out(config_model, out_dir, overwrite)
    quant_config = _quant_config(manifest, source)

    def fill(tmp: Path, sums: dict[str, str]) -> dict:
        _write_shards(shards, tmp, sums)
        config_model.save_config(tmp)
        _add_quantization_config(tmp / CONFIG_NAME, quant_config)
        report, files = finish(tmp)
        for name, data in _check_extra_files(files or {}).items():
            _write_bytes(tmp / name, data, sums)
        return report

    return _write_atomically(out, fill, check, pipeline)


def _write_shards(shards: list[Path], tmp: Path, sums: dict[str, str]) -> None:
    """`shards` as the artifact's weight shards in `tmp`, with their index; their digests go into `sums`."""
    weight_map, total = {}, 0
    for i, src in enumerate(shards):
        name = shard_name(i + 1, len(shards))
        sums[name] = _link_or_copy(Path(src), tmp / name)
        for key in read_safetensors_header(tmp / name):
            if key in weight_map:
                raise ArtifactError(f"tensor {key} is in two shards ({weight_map[key]}, {name})")
            weight_map[key] = name
        total += (tmp / name).stat().st_size
    _write_bytes(tmp / INDEX_NAME, _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               "index"), sums)


def _check_out(model: nn.Module, out_dir, overwrite: bool) -> Path:
    out = Path(out_dir)
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ModelError(f"cannot write {type(model).__name__}: not a diffusers model (no save_pretrained/config)")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists",
                            hint="choose another output directory, or pass overwrite=True (CLI: --overwrite)")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory", hint="remove it or choose another output path")
    return out


def _quant_config(manifest: list[dict], source: dict) -> dict:
    return {"quant_method": "dicompress", "format_version": FORMAT_VERSION,
            "dicompress_version": dicompress_version(), "manifest": list(manifest), "source": dict(source),
            CONFIG_KEY: writer_identity()}      # dropped by mark_complete, just before the rename


def _write_atomically(out: Path, fill, check: LoadCheck | None = None,
                      pipeline: PipelineOutput | None = None) -> Path:
    """`fill(art, sums) -> report` writes the artifact but its report into `art` (a hidden sibling temp directory,
    marked incomplete; with `pipeline`, that directory's transformer/, marked too) and puts the digests it took
    while writing into `sums`; the rest are hashed, all recorded in config.json, the artifact verified (with
    `check`: loaded as users load it and compared with the probes; the result goes into the report); with
    `pipeline` the source's other components and model_index.json are placed beside it; the report is written,
    the tree fsynced, unmarked and only then renamed to `out`. Holds `out`'s run lock (taken here unless this
    process holds it): the temp directories no live writer owns are removed first."""
    with output_lock(out):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(out)
            tmp = make_temp_dir(out, "incomplete")
        except OSError as e:
            raise _cannot_write(out, e) from None
        try:
            art = tmp if pipeline is None else make_marked_dir(tmp / TRANSFORMER_DIR, out)
            with writing(tmp), (writing(art) if art != tmp else nullcontext()):
                sums: dict[str, str] = {}
                report = fill(art, sums)
                _record_checksums(art, sums)
                verify_artifact(art)
                if check is not None:
                    report = {**report, "load_check": check.run(art)}
                if pipeline is not None:
                    pipeline.result = place_components(pipeline, tmp)
                    report = {**report, "pipeline_output": pipeline.result}
                _write_bytes(art / REPORT_NAME, _json_bytes(report, "report"))
                _fsync_tree(tmp)
            if art != tmp:
                mark_complete(art)
            mark_complete(tmp)
            _swap_into_place(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _cannot_write(out, e) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _cannot_write(out: Path, e: OSError) -> ArtifactError:
    where = f" ({e.filename})" if e.filename else ""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return ArtifactError(f"cannot write the artifact {out}: {e.strerror or e}{where}; nothing was written",
                         hint=f"free space on the disk holding {out.parent} and run again (finished work is kept)"
                         if full else f"check that {out.parent} is writable, or choose another --output")


def _record_checksums(tmp: Path, sums: dict[str, str]) -> None:
    """config.json's quantization_config gains {file: SHA-256} for every file but itself and report.json."""
    config = json.loads((tmp / CONFIG_NAME).read_text())
    config["quantization_config"]["checksums"] = complete_checksums(tmp, sums)
    _write_bytes(tmp / CONFIG_NAME, _json_bytes(config, "checksums"))


def _link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link `src` at `dst` (the work directory sits beside the output: no copy of the weights), else copy it;
    returns its SHA-256 (hashed once when linked, while copying otherwise)."""
    try:
        os.link(src, dst)
    except OSError:
        return copy_with_sha256(src, dst)
    return sha256_file(dst)


def _check_extra_files(files: dict[str, bytes]) -> dict[str, bytes]:
    for name, data in files.items():
        # save_pretrained deletes stale "diffusion_pytorch_model*" shards, so those names are taken too
        if name in _RESERVED or Path(name).name != name or name.startswith((".", WEIGHTS_PREFIX)):
            raise ValueError(f"extra artifact file {name!r}: use a plain file name, not hidden, not "
                             f"{WEIGHTS_PREFIX}*, and none of {sorted(_RESERVED)}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"extra artifact file {name!r}: expected bytes, got {type(data).__name__}")
    return files


def _add_quantization_config(path: Path, quant_config: dict) -> None:
    config = json.loads(path.read_text())
    config.pop("_pre_quantization_dtype", None)  # set by diffusers on loaded quantized models
    config["quantization_config"] = quant_config
    _write_bytes(path, _json_bytes(config, "manifest/source"))


def _json_bytes(obj: Any, what: str) -> bytes:
    def scalar(v):  # numpy / torch scalars and small arrays from metrics
        if hasattr(v, "tolist"):
            return v.tolist()
        raise TypeError(f"{what} holds a {type(v).__name__}, which is not JSON-serialisable; convert it first")
    return (json.dumps(obj, indent=2, sort_keys=False, default=scalar) + "\n").encode()


def _write_bytes(path: Path, data: bytes, sums: dict[str, str] | None = None) -> None:
    """Write `data` to `path`; with `sums`, record its SHA-256 under the file's name."""
    with open(path, "wb") as f:
        f.write(data)
    if sums is not None:
        sums[path.name] = hashlib.sha256(data).hexdigest()


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root` (recursively), then each directory."""
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink():
            _fsync_tree(p)
            continue
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """rename(tmp -> out). An existing `out` is exchanged with `tmp` in one step (Linux renameat2), so `out` is
    always the old artifact or the new one, then deleted; where the OS cannot exchange, it is moved aside first
    (a marked temp directory) and deleted after the rename."""
    if not out.exists():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    if _exchange(tmp, out):          # tmp now holds the old artifact
        fsync_dir(out.parent)
        discard(tmp)
        return
    old = make_temp_dir(out, "replaced")     # marked: removed by the next write if this process dies
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)      # put the previous artifact back
        shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the OS, libc or file system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
