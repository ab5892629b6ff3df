"""Artifacts: write (atomically), verify (headers only), load (through diffusers).

Layout, as diffusers' `save_pretrained` writes it, plus two things of ours:
    config.json                         the model's diffusers config + `quantization_config` (the manifest)
    diffusion_pytorch_model.safetensors (or -0000i-of-0000n shards + .safetensors.index.json)
    report.json                         what the passes measured
    <extra files>                       samples.png, conditioning.safetensors ...
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ModelError
from .manifest import FORMAT_VERSION, dicompress_version, replay

CONFIG_NAME = "config.json"
REPORT_NAME = "report.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DEFAULT_SHARD_SIZE = "5GB"
_RESERVED = {CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME, INDEX_NAME}

# safetensors header dtype names
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _st
ST_DTYPE_BY_NAME = {v: k for k, v in _ST_DTYPES.items()}    # a safetensors header's dtype name -> torch dtype
_MAX_HEADER = 100 << 20


# ------------------------------------------------------------------------------------------------
# write
# ------------------------------------------------------------------------------------------------
def write_artifact(model: nn.Module, out_dir: str | os.PathLike, *, manifest: list[dict], report: dict,
                   source: dict, files: dict[str, bytes] | None = None, overwrite: bool = False,
                   max_shard_size: int | str = DEFAULT_SHARD_SIZE, save_dtype: torch.dtype | None = None) -> Path:
    """Write `model` (already rewritten in place) as a dicompress artifact at `out_dir`; floating parameters
    are stored as `save_dtype` (None: as they are; see `storage.py`).

    Everything goes into a hidden sibling temp directory, is fsynced and verified, and only then
    renamed into place: a crash at any point leaves `out_dir` absent (or, when overwriting, the old
    artifact intact). Returns the artifact path.
    """
    out = _check_out(model, out_dir, overwrite)
    extra = _check_extra_files(files or {})
    quant_config = _quant_config(manifest, source)

    def fill(tmp: Path) -> None:
        _write_bytes(tmp / REPORT_NAME, _json_bytes(report, "report"))
        for name, data in extra.items():
            _write_bytes(tmp / name, data)
        from .storage import parameters_stored_as
        with parameters_stored_as(model, save_dtype):
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        # Last: until config.json carries the manifest, the directory is not a dicompress artifact.
        _add_quantization_config(tmp / CONFIG_NAME, quant_config)

    return _write_atomically(out, fill)


def write_artifact_from_shards(config_model: nn.Module, shards: list[Path], out_dir: str | os.PathLike, *,
                               manifest: list[dict], source: dict, finish, overwrite: bool = False) -> Path:
    """Write an artifact whose weights are already safetensors files (the streaming pipeline's finished
    blocks): they become the artifact's shards (hard-linked when on the same file system, else copied), with
    the index, and `config_model`'s config (+ the manifest). `finish(tmp_dir) -> (report, files)` runs once
    weights and config are in place (it may load the artifact from there, e.g. to evaluate it); then, as
    `write_artifact`, everything is fsynced, verified and renamed into place."""
    out = _check_out(config_model, out_dir, overwrite)
    quant_config = _quant_config(manifest, source)

    def fill(tmp: Path) -> None:
        weight_map, total = {}, 0
        for i, src in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _link_or_copy(Path(src), tmp / name)
            for key in read_safetensors_header(tmp / name):
                if key in weight_map:
                    raise ArtifactError(f"tensor {key} is in two shards ({weight_map[key]}, {name})")
                weight_map[key] = name
            total += (tmp / name).stat().st_size
        _write_bytes(tmp / INDEX_NAME, _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   "index"))
        config_model.save_config(tmp)
        _add_quantization_config(tmp / CONFIG_NAME, quant_config)
        report, files = finish(tmp)
        for name, data in _check_extra_files(files or {}).items():
            _write_bytes(tmp / name, data)
        _write_bytes(tmp / REPORT_NAME, _json_bytes(report, "report"))

    return _write_atomically(out, fill)


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
            "dicompress_version": dicompress_version(), "manifest": list(manifest), "source": dict(source)}


def _write_atomically(out: Path, fill) -> Path:
    """`fill(tmp)` writes the artifact into a hidden sibling temp directory, which is fsynced, verified and only
    then renamed to `out`: a crash at any point leaves `out` absent (or, when overwriting, the old one intact)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        verify_artifact(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)          # the work directory sits beside the output: no copy of the weights
    except OSError:
        shutil.copyfile(src, dst)


def _check_extra_files(files: dict[str, bytes]) -> dict[str, bytes]:
    for name, data in files.items():
        # save_pretrained deletes stale "diffusion_pytorch_model*" shards, so those names are taken too
        if name in _RESERVED or Path(name).name != name or name.startswith((".", "diffusion_pytorch_model")):
            raise ValueError(f"extra artifact file {name!r}: use a plain file name, not hidden, not "
                             f"diffusion_pytorch_model*, and none of {sorted(_RESERVED)}")
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


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _fsync_tree(root: Path) -> None:
    for p in root.iterdir():
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
    """rename(tmp -> out); an existing `out` is moved aside first and deleted only after the rename."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the previous artifact back
            os.replace(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------
def verify_artifact(path: str | os.PathLike) -> dict:
    """Check an artifact without reading tensor data; returns a summary or raises ArtifactError."""
    root = Path(path)
    config = read_config(root)
    qc = config["quantization_config"]
    headers = _read_weight_headers(root)
    tensors = {k: v for h in headers.values() for k, v in h.items()}
    _check_against_manifest(root, config, tensors)
    return {"path": str(root), "class_name": config["_class_name"], "n_tensors": len(tensors),
            "bytes": sum((root / f).stat().st_size for f in headers),
            "manifest_length": len(qc["manifest"]), "format_version": qc["format_version"],
            "dicompress_version": qc.get("dicompress_version"), "weight_files": sorted(headers)}


def read_config(root: Path) -> dict:
    """config.json of a dicompress artifact, with its quantization_config checked."""
    if not root.is_dir():
        raise ArtifactError(f"no artifact at {root}: directory missing",
                            hint="check the path; an interrupted write leaves no directory")
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise ArtifactError(f"{root} has no {CONFIG_NAME}: not a complete artifact",
                            hint="re-run the compression that writes it")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{cfg_path} is not readable JSON: {e}", hint="re-run the compression") from e
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "dicompress":
        what = f"quantized with {method!r}" if method else "a plain diffusers model"
        raise ArtifactError(f"{root} is {what}, not a dicompress artifact "
                            f"(config.json has no quantization_config.quant_method = 'dicompress')",
                            hint="load it with diffusers' from_pretrained directly, or compress it first")
    version = qc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{cfg_path}: quantization_config.format_version is {version!r}, not a positive int",
                            hint="config.json was edited or damaged; re-run the compression")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{root} was written by a newer dicompress (format {version} > {FORMAT_VERSION}); "
                            f"upgrade dicompress",
                            hint=f"it was written by dicompress {qc.get('dicompress_version') or '(unknown)'}; "
                                 f"`pip install -U dicompress`")
    if not isinstance(qc.get("manifest"), list) or not isinstance(config.get("_class_name"), str):
        raise ArtifactError(f"{cfg_path} lacks a manifest list or _class_name", hint="re-run the compression")
    return config


def _read_weight_headers(root: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """file name -> {tensor: (dtype, shape)}; checks the index (if sharded) against the shards."""
    index_path = root / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{index_path} is unreadable: {e}", hint="re-run the compression") from e
        names = sorted(set(weight_map.values()))
    elif (root / WEIGHTS_NAME).is_file():
        weight_map, names = None, [WEIGHTS_NAME]
    else:
        raise ArtifactError(f"{root} has no weights ({WEIGHTS_NAME} or {INDEX_NAME})",
                            hint="the write did not finish; re-run the compression")
    headers = {}
    for name in names:
        if Path(name).name != name or not (root / name).is_file():
            raise ArtifactError(f"{root}: weight shard {name!r} listed in the index is missing",
                                hint="copy the complete artifact directory")
        headers[name] = read_safetensors_header(root / name)
    if weight_map is not None:
        actual = {k: f for f, h in headers.items() for k in h}
        if actual != weight_map:
            bad = sorted(set(actual.items()) ^ set(weight_map.items()))[:5]
            raise ArtifactError(f"{index_path} does not match the shards' contents, e.g. {bad}",
                                hint="the artifact was edited or partly copied; re-run the compression")
    return headers


ALIGN = 64


def save_aligned_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """A safetensors file whose tensors start at 64-byte file offsets wherever their sizes allow (the header is
    padded so the data section starts aligned; tensors whose sizes are multiples of 64 bytes come first). A
    loader's memory-mapped views are then aligned as CPU GEMM wants, so `_realign_cpu_tensors` copies only the
    few small odd-sized tensors at the end, not the weights. The format has no holes: offsets are contiguous."""
    order = sorted(tensors, key=lambda k: (_nbytes(tensors[k]) % ALIGN != 0, k))
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store {k} of dtype {t.dtype} in safetensors")
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            t = tensors[k].detach().contiguous().cpu()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)     # the tensor's bytes, not a copy


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (dtype, shape)} from a safetensors header; raises if the file is truncated or corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > min(size - 8, _MAX_HEADER):
            raise ArtifactError(f"{path}: unreadable safetensors header (file is {size} bytes; truncated?)",
                                hint="the file is damaged; copy or write the artifact again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        out, end = {}, 0
        for name, t in header.items():
            begin, stop = t["data_offsets"]
            out[name] = (t["dtype"], tuple(t["shape"]))
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: unreadable safetensors header ({e})",
                            hint="the file is damaged; copy or write the artifact again") from e
    if 8 + n + end > size:
        raise ArtifactError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end} bytes",
                            hint="the file is damaged or was cut while copying; copy or write the artifact again")
    return out


def meta_model(config: dict, *, replayed: bool = True) -> nn.Module:
    """The artifact's model on the meta device, built from its config (and rebuilt by its manifest)."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None:
        raise ArtifactError(f"config.json names class {config['_class_name']!r}, which diffusers "
                            f"{diffusers.__version__} does not have", hint="upgrade diffusers")
    from accelerate import init_empty_weights

    init = {k: v for k, v in config.items() if k != "quantization_config"}
    with init_empty_weights():  # what diffusers' from_pretrained uses: parameters on meta, buffers real
        model = cls.from_config(init)
    if replayed:
        qc = config["quantization_config"]
        replay(model, qc["manifest"], device="meta", written_by=qc.get("dicompress_version"))
    return model


def _check_against_manifest(root: Path, config: dict, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """The stored tensors must be exactly what the replayed model expects.

    Tensors of modules the manifest touched must match in shape and dtype, except parameters
    (e.g. a bias), whose dtype follows the model's. Other tensors must match in shape.
    """
    model = meta_model(config)
    params = {n for n, _ in model.named_parameters()}
    touched = tuple(e["module"] + "." for e in config["quantization_config"]["manifest"])
    problems = []
    expected = model.state_dict()
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"missing {name}")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected {name}")
    for name in sorted(set(expected) & set(tensors)):
        want_dtype = _ST_DTYPES.get(expected[name].dtype, str(expected[name].dtype))
        want = (want_dtype, tuple(expected[name].shape))
        got_dtype, got_shape = tensors[name]
        if got_shape != want[1]:
            problems.append(f"{name} has shape {got_shape}, expected {want[1]}")
        elif name.startswith(touched) and name not in params and got_dtype != want_dtype:
            problems.append(f"{name} has dtype {got_dtype}, expected {want_dtype}")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ArtifactError(f"{root}: the manifest does not match the tensors: " + "; ".join(problems[:8]) + more,
                            hint="config.json's manifest and the weights disagree (edited, or written by a "
                                 "buggy pass); re-run the compression")


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def load(artifact_dir: str | os.PathLike, device: str | torch.device = "cpu",
         torch_dtype: torch.dtype | None = None, plug=None) -> nn.Module:
    """Verify, then load through diffusers' own `from_pretrained`; returns the model in eval mode.

    `torch_dtype` applies to the uncompressed parameters only; codec tensors keep their stored dtypes.
    With the default (None) those parameters are fp32, whatever dtype stores them: what CPU inference wants.
    `plug`: for `ppcl_depth` artifacts, the interval numbers to keep plugged in (None = all); the others get
    their teacher blocks back.
    """
    import diffusers

    from .diffusers_plugin import register_with_diffusers

    summary = verify_artifact(artifact_dir)
    register_with_diffusers()
    cls = getattr(diffusers, summary["class_name"])
    model = cls.from_pretrained(artifact_dir, torch_dtype=torch_dtype or torch.float32)
    if plug is not None:
        from .pluggable import plug_intervals
        plug_intervals(model, artifact_dir, read_config(Path(artifact_dir)), plug)
    return model.to(device).eval()
