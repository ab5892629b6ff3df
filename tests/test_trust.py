"""Artifacts that can be trusted: every file's SHA-256 is recorded at write time and checked on request
(`dicompress verify`, `inspect --verify`, `load(verify=True)`); damaged headers are refused with ArtifactError;
a directory left by an interrupted write is marked, refused, and removed by the next write; normal permissions."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import FluxTransformer2DModel

import dicompress
from dicompress.cli import main
from dicompress.errors import ArtifactError
from dicompress.io import load, verify_artifact, write_artifact, write_artifact_from_shards
from dicompress.io import writer as writer_mod
from dicompress.io.names import INDEX_NAME, MARKER_NAME
from dicompress.io.safetensors_file import read_safetensors_header, save_aligned_safetensors
from dicompress.io.storage import stored_state_dict
from tests.conftest import TINY_FLUX

QLINEAR = "transformer_blocks.0.attn.to_q"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A TLQ-4 tiny FLUX, written in several shards with an extra file; (model, artifact dir, manifest)."""
    torch.manual_seed(0)
    tlq = dicompress.TLQ(bits=4, include=("transformer_blocks.*.attn.to_*",))    # a few linears: fast
    state = dicompress.compress(FluxTransformer2DModel(**TINY_FLUX), [tlq], progress=False)
    out = tmp_path_factory.mktemp("trust") / "art"
    write_artifact(state.model, out, manifest=state.manifest, report={}, source={"model": "random tiny flux"},
                   files={"conditioning.safetensors": b"not really a safetensors file"}, max_shard_size="60KB")
    return state.model, out, state.manifest


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def qconfig(root: Path) -> dict:
    return json.loads((root / "config.json").read_text())["quantization_config"]


def where(root: Path, tensor: str) -> tuple[str, int, int]:
    """(shard name, start, stop) of a tensor's bytes in its shard."""
    shard = json.loads((root / INDEX_NAME).read_text())["weight_map"][tensor]
    entry = read_safetensors_header(root / shard)[tensor]
    return shard, entry.start, entry.stop


def test_checksums_cover_every_file_and_verify_says_ok(art):
    _, out, _ = art
    sums = qconfig(out)["checksums"]
    shards = sorted(set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values()))
    assert len(shards) > 1 and set(sums) == {*shards, INDEX_NAME, "conditioning.safetensors"}
    for name, hexdigest in sums.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == hexdigest
    r = cli("verify", out)
    assert r.exit_code == 0 and r.output.startswith(f"OK {out}: {len(sums)} files match their SHA-256")
    r = cli("inspect", out, "--verify")
    assert r.exit_code == 0 and "verified: OK" in r.output
    assert not list(out.parent.glob(".art.*"))          # no temp dir, no marker left
    assert not (out / MARKER_NAME).exists()


@pytest.mark.parametrize("tensor", ["x_embedder.weight", f"{QLINEAR}.qweight"])   # an fp32 weight, packed codes
def test_a_flipped_byte_is_found(art, tmp_path, tensor):
    _, out, _ = art
    dst = copy_of(out, tmp_path)
    shard, start, stop = where(dst, tensor)
    assert read_safetensors_header(dst / shard)[tensor].dtype == ("U8" if "qweight" in tensor else "F32")
    with open(dst / shard, "r+b") as f:
        f.seek((start + stop) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    for args in (("verify", dst), ("inspect", dst, "--verify")):
        r = cli(*args)
        assert r.exit_code == 3, r.output
        assert f"{shard} differs from its recorded SHA-256" in r.output and "Traceback" not in r.output
        others = [n for n in qconfig(dst)["checksums"] if n != shard]
        assert not any(f"{n} differs" in r.output for n in others)
    with pytest.raises(ArtifactError, match=f"{shard} differs"):
        load(dst, verify=True)
    load(dst)                # the default checks headers only: a flipped value byte loads


def test_a_missing_or_unrecorded_shard_is_named(art, tmp_path):
    _, out, _ = art
    dst = copy_of(out, tmp_path)
    config = json.loads((dst / "config.json").read_text())
    shard, _, _ = where(dst, f"{QLINEAR}.qweight")
    del config["quantization_config"]["checksums"][shard]
    (dst / "config.json").write_text(json.dumps(config))
    r = cli("verify", dst)
    assert r.exit_code == 3 and f"{shard} has no recorded checksum" in r.output


def test_artifacts_without_checksums_still_load(art, tmp_path):
    _, out, _ = art
    dst = copy_of(out, tmp_path)
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]["checksums"]
    (dst / "config.json").write_text(json.dumps(config))
    r = cli("verify", dst)
    assert r.exit_code == 0 and "records no checksums" in r.output
    assert verify_artifact(dst, checksums=True)["checksums"] is None
    load(dst, verify=True)


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_overlapping_tensors_are_refused_by_load_and_inspect(art, tmp_path):
    _, out, _ = art
    dst = copy_of(out, tmp_path)
    shard, _, _ = where(dst, f"{QLINEAR}.qweight")

    def overlap(header):   # two tensors of one size in one shard: the second points at the first's bytes
        by_size = {}
        for name, t in header.items():
            if name != "__metadata__":
                by_size.setdefault((t["dtype"], tuple(t["shape"])), []).append(name)
        a, b = next(v for v in by_size.values() if len(v) > 1)[:2]
        header[b]["data_offsets"] = header[a]["data_offsets"]

    _rewrite_header(dst / shard, overlap)
    with pytest.raises(ArtifactError, match="overlaps"):
        load(dst)
    r = cli("inspect", dst)
    assert r.exit_code == 3 and "overlaps" in r.output and "Traceback" not in r.output


def test_trailing_bytes_are_refused(art, tmp_path):
    _, out, _ = art
    dst = copy_of(out, tmp_path)
    shard, _, _ = where(dst, f"{QLINEAR}.qweight")
    with open(dst / shard, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ArtifactError, match="after the last tensor"):
        load(dst)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def mark(d: Path, pid: int) -> None:
    import socket
    (d / MARKER_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "output": "art"}))


def test_a_marked_directory_is_refused(art, tmp_path):
    _, out, _ = art
    dst = copy_of(out, tmp_path)
    mark(dst, dead_pid())
    with pytest.raises(ArtifactError, match="an interrupted write left this; delete it"):
        load(dst)
    with pytest.raises(ArtifactError, match="incomplete artifact"):
        verify_artifact(dst)
    for args in (("inspect", dst), ("verify", dst)):
        r = cli(*args)
        assert r.exit_code == 3 and "interrupted" in r.output and "Traceback" not in r.output
    mark(dst, os.getppid())                                   # a live writer: wait, not delete
    with pytest.raises(ArtifactError, match="still writing"):
        load(dst)


def test_the_next_write_removes_the_temp_dirs_no_live_writer_owns(art, tmp_path):
    """Holding the output's lock, the writer removes dead writers' temp dirs and unmarked ones (a write killed
    between its unmark and rename, or an old artifact moved aside); a live writer's stays."""
    model, _, manifest = art
    dead, live = tmp_path / ".out.tmp-incomplete-dead", tmp_path / ".out.tmp-replaced-live"
    unmarked = tmp_path / ".out.tmp-incomplete-x"
    for d in (dead, live, unmarked):
        d.mkdir()
    mark(dead, dead_pid())
    mark(live, os.getppid())
    write_artifact(model, tmp_path / "out", manifest=manifest, report={}, source={})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifact_dirs_get_normal_permissions(art, tmp_path, umask):
    model, _, manifest = art
    old = os.umask(umask)
    try:
        out = write_artifact(model, tmp_path / "out", manifest=manifest, report={}, source={})
        write_artifact(model, out, manifest=manifest, report={}, source={}, overwrite=True)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask


@pytest.mark.parametrize("linked", [True, False])
def test_streamed_shards_are_checksummed_linked_or_copied(art, tmp_path, monkeypatch, linked):
    model, _, manifest = art
    state = stored_state_dict(model, None)
    keys = sorted(state)
    work = tmp_path / "work"
    work.mkdir()
    shards, digests = [], []
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shards.append(work / f"{i}.safetensors")
        digests.append(save_aligned_safetensors({k: state[k] for k in part}, shards[-1]))
    if not linked:
        monkeypatch.setattr(writer_mod.os, "link", lambda *a: (_ for _ in ()).throw(OSError("cross-device")))
    seen = {}

    def finish(tmp):        # the streaming pipeline evaluates the artifact from its (marked) temp dir
        seen["marked"] = (tmp / MARKER_NAME).is_file()
        load(tmp)
        return {}, {}

    out = write_artifact_from_shards(model, shards, tmp_path / "out", manifest=manifest, source={}, finish=finish)
    sums = qconfig(out)["checksums"]
    assert seen["marked"] and [sums[n] for n in sorted(s for s in sums if s != INDEX_NAME)] == digests
    assert cli("verify", out).exit_code == 0
