"""safetensors files read and written by hand: one header reader, with the checks that catch a truncated or
damaged file (everything that reads a header goes through it), and a writer that aligns tensor data.

The format: an 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}}
(offsets relative to the data section), then the data section, its tensors back to back.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import ArtifactError, DicompressError

ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}    # torch dtype -> a safetensors header's dtype name
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        ST_DTYPES[getattr(torch, _name)] = _st
ST_DTYPE_BY_NAME = {v: k for k, v in ST_DTYPES.items()}    # a safetensors header's dtype name -> torch dtype
MAX_HEADER = 100 << 20
ALIGN = 64
CHECKPOINT_HINT = "the checkpoint file is damaged or incomplete; download or save the model again"


class TensorEntry(NamedTuple):
    """One tensor of a safetensors header; `start` / `stop` are absolute byte offsets in the file."""
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def read_safetensors_header(path: str | os.PathLike, *, error: type[DicompressError] = ArtifactError,
                            hint: str | None = None) -> dict[str, TensorEntry]:
    """{tensor: TensorEntry} from a safetensors file's header, without reading tensor data. Raises `error` if the
    header is unreadable, a tensor's byte range is malformed or disagrees with its dtype and shape, or the file is
    too short for the data its header describes (truncated); `hint` replaces the artifact-minded default hints."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > min(size - 8, MAX_HEADER):
            raise error(f"{path}: unreadable safetensors header (file is {size} bytes; truncated?)",
                        hint=hint or "the file is damaged; copy or write the artifact again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        entries = {name: _entry(name, t, 8 + n) for name, t in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise error(f"{path}: unreadable safetensors header ({e})",
                    hint=hint or "the file is damaged; copy or write the artifact again") from e
    need = max((e.stop for e in entries.values()), default=8 + n)
    if need > size:
        raise error(f"{path} is truncated: {size} bytes, its header needs {need} bytes",
                    hint=hint or "the file is damaged or was cut while copying; copy or write the artifact again")
    problem = _layout_problem(entries, 8 + n, size)
    if problem:
        raise error(f"{path}: malformed safetensors header: {problem}",
                    hint=hint or "the file is damaged or was edited; copy or write the artifact again")
    return entries


def _layout_problem(entries: dict[str, TensorEntry], data_start: int, size: int) -> str | None:
    """What safetensors itself refuses (its loader then fails with a bare OSError): tensors whose byte ranges
    overlap or leave a gap (the data section is the tensors back to back), or bytes after the last tensor."""
    at, prev = data_start, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].stop)):
        if e.start < at:
            return f"tensor {name} (bytes {e.start}..{e.stop}) overlaps {prev}"
        if e.start > at:
            return f"{e.start - at} bytes before tensor {name} belong to no tensor"
        at, prev = e.stop, name
    if at != size:
        return f"{size - at} bytes after the last tensor belong to no tensor"
    return None


def _entry(name: str, t: dict, data_start: int) -> TensorEntry:
    """A header entry, checked: integer offsets in order, spanning exactly the bytes its dtype and shape need."""
    begin, end = t["data_offsets"]
    shape = tuple(t["shape"])
    if not all(isinstance(v, int) and v >= 0 for v in (begin, end, *shape)) or begin > end:
        raise ValueError(f"tensor {name} has data_offsets {[begin, end]} and shape {list(shape)}")
    dtype = ST_DTYPE_BY_NAME.get(t["dtype"])
    if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name} ({t['dtype']} {list(shape)}) spans {end - begin} bytes, "
                         f"not {math.prod(shape) * dtype.itemsize}")
    return TensorEntry(t["dtype"], shape, data_start + begin, data_start + end)


def save_aligned_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> str:
    """A safetensors file whose tensors start at 64-byte file offsets wherever their sizes allow (the header is
    padded so the data section starts aligned; tensors whose sizes are multiples of 64 bytes come first). A
    loader's memory-mapped views are then aligned as CPU GEMM wants, so `_realign_cpu_tensors` copies only the
    few small odd-sized tensors at the end, not the weights. The format has no holes: offsets are contiguous.
    Returns the file's SHA-256 (hex), taken as the bytes are written."""
    order = sorted(tensors, key=lambda k: (_nbytes(tensors[k]) % ALIGN != 0, k))
    header, offset = {}, 0
    for k in order:
        t = tensors[k]
        if t.dtype not in ST_DTYPES:
            raise TypeError(f"cannot store {k} of dtype {t.dtype} in safetensors")
        header[k] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for k in order:
            t = tensors[k].detach().contiguous().cpu()
            if t.numel():
                data = t.reshape(-1).view(torch.uint8).numpy().data     # the tensor's bytes, not a copy
                f.write(data)
                digest.update(data)
    return digest.hexdigest()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
