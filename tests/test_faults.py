"""Fault injection: what a user is promised when a run dies, collides, cannot write, or its artifact rots.

1. A `dicompress run` killed (SIGKILL) at each phase, on the whole-model path and the streamed one: nothing it leaves
   loads as an artifact, the lock is free, the same command then completes with the artifact an uninterrupted run
   writes (every tensor, every file's bytes, the manifest), resuming finished blocks, and the dead run's temp
   directories are gone.
2. Two runs on one output: the second exits at once (code 3, naming the first's pid); the first is unharmed.
3. Read-only destinations and a full disk: a named error, the documented exit code, no traceback, nothing
   half-written.
4. One flipped byte in any tensor kind of a W4A8 artifact (both paths' layouts) or in its index: `verify`,
   `inspect --verify` and `load(verify=True)` refuse it naming the file (overlapping and trailing bytes in a
   header: tests/test_trust.py).

The runs are child processes of a fork server (tests/faults_helpers.py): each is killed by a hook that the child
installs itself on the production function of the phase (no production hook), at a call counted from the start.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

import dicompress
from dicompress.errors import ArtifactError
from dicompress.io.names import CONFIG_NAME, INDEX_NAME, MARKER_NAME, WEIGHTS_GLOB
from dicompress.io.safetensors_file import read_safetensors_header
from dicompress.runlock import lock_path, output_lock
from tests.faults_helpers import ForkServer, hook
from tests.test_streaming import _recipe, assert_same_artifact
from tests.test_trust import _rewrite_header, cli, qconfig

# LRQ-DiT W4A8 as the recipes run it (smooth, ARS, TLQ with GPTQ, A8), with a narrower TLQ search: every pass and
# every tensor kind of the real recipe, in a fraction of the time
PASSES = [{"smooth": {"alpha": 0.5}}, {"ars": {"threshold": 1.0}},
          {"tlq": {"bits": 4, "gptq": True, "etas": [0.0, 0.01], "percentiles": [1.0]}}, {"act_quant": {"bits": 8}}]
CAL = {"source": "classes", "classes": [0, 1, 2], "seeds": [0], "steps": 3, "batch_size": 3}
N_BLOCKS = 4           # tiny_zoo_dir: 2 double + 2 single blocks


# ------------------------------------------------------------------------------------------------ fixtures, helpers
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("fault_logs"))
    yield s
    s.close()


def recipe_in(d: Path, model, streaming: bool, **extra) -> Path:
    """A recipe in its own directory `d`: output `d/art`, calibration cache `d/cache` (empty: nothing reused)."""
    d.mkdir(parents=True, exist_ok=True)
    return _recipe(d / "recipe.yaml", model, d / "art", passes=PASSES, calibration=CAL,
                   streaming={"enabled": streaming}, **extra)


def run_argv(recipe: Path, *extra) -> list:
    return ["run", recipe, "--quiet", *extra]


def ok(result) -> None:
    assert result.rc == 0 and not result.timed_out, result
    assert "Traceback" not in result.output, result


@pytest.fixture(scope="module")
def refs(server, tiny_zoo_dir, tmp_path_factory):
    """The uninterrupted runs every faulted run must reproduce: {"mem": artifact, "st": artifact}."""
    d = tmp_path_factory.mktemp("fault_refs")
    out = {}
    for path, streaming in (("mem", False), ("st", True)):
        recipe = recipe_in(d / path, tiny_zoo_dir, streaming)
        ok(server.run(run_argv(recipe)))
        out[path] = d / path / "art"
    return out


def assert_identical(ref: Path, got: Path) -> None:
    """Every tensor (dtype and bits), the manifest and config (but the recipe's path), and every covered file's
    bytes (their SHA-256s) equal the reference's; the same files."""
    assert_same_artifact(ref, got)
    assert qconfig(ref)["checksums"] == qconfig(got)["checksums"]
    assert sorted(p.name for p in ref.iterdir() if p.name != "report.json") == \
        sorted(p.name for p in got.iterdir() if p.name != "report.json")


def temp_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def refuse_all(d: Path) -> list[str]:
    """Check that nothing loads `d` as an artifact: dicompress.load (ArtifactError), `dicompress verify` (exit 3,
    no traceback); returns the broken promises of diffusers' own from_pretrained."""
    from diffusers import FluxTransformer2DModel
    with pytest.raises(ArtifactError):
        dicompress.load(d)
    r = cli("verify", d)
    assert r.exit_code == 3 and "Traceback" not in r.output, r.output
    try:
        FluxTransformer2DModel.from_pretrained(d)
    except Exception:  # noqa: BLE001  (refused: any error will do here; dicompress.load gives the clear one)
        return []
    return [f"FluxTransformer2DModel.from_pretrained loads the leftover {d.name} "
            f"({'marked' if (d / MARKER_NAME).exists() else 'unmarked'}) as a complete model"]


def refused_by_name(d: Path, art: Path) -> None:
    """An unmarked temp directory (a complete artifact under its temp name) is refused by dicompress's readers,
    naming the output it was written for; diffusers' own from_pretrained would load it (it is complete)."""
    with pytest.raises(ArtifactError, match=f"temp directory of a dicompress write to {art}"):
        dicompress.load(d)
    r = cli("verify", d)
    assert r.exit_code == 3 and "Traceback" not in r.output, r.output


def lock_is_free(out: Path) -> None:
    with output_lock(out):
        assert json.loads(lock_path(out).read_text()) == os.getpid()


def resumed_blocks(art: Path) -> int | None:
    streaming = json.loads((art / "report.json").read_text()).get("streaming")
    return None if streaming is None else streaming["resumed_blocks"]


# ------------------------------------------------------------------------------------------------ 1. kill and resume
WQ = "dicompress.passes._weight_quant"
# phase -> (hook arguments, finished blocks a streamed rerun resumes); mem / st: whole-model / streamed path
KILLS = {
    "capture": (dict(target="dicompress.calib.store:StoreWriter.write_chunk", at=3, action="kill"), 0),
    "first_pass": (dict(target="dicompress.passes.smooth:smooth_group", at=2, action="kill"), 0),
    # mem: the 10th of 34 GPTQ solves; st: the 2nd GPTQ solve of block 2 (blocks 0 and 1 are finished)
    "later_pass_mem": (dict(target=f"{WQ}:gptq_codes", at=10, action="kill"), None),
    "later_pass_st": (dict(target=f"{WQ}:gptq_codes", at=2, action="kill", arm=(f"{WQ}:WeightQuantPass.apply", 3)), 2),
    # diffusers' save_pretrained writing the artifact's shard: cut to half its size, then killed
    "shard_write_mem": (dict(target="safetensors.torch:save_file", at=1, action="truncate_kill"), None),
    # the journal's shard of block 1 (after _root, block 0): half-written .tmp, then killed
    "block_shard_write_st": (dict(target="dicompress.stream.journal:save_aligned_safetensors", at=3,
                                  action="truncate_kill"), 1),
    # the finished blocks' shards linked into the temp directory: 3 of 5, then killed
    "artifact_link_st": (dict(target="dicompress.io.writer:_link_or_copy", at=3, action="kill_after"), N_BLOCKS),
    # verified, still marked
    "before_unmark": (dict(target="dicompress.io.writer:mark_complete", at=1, action="kill"), N_BLOCKS),
    # unmarked, not yet renamed
    "before_rename": (dict(target="dicompress.io.writer:_swap_into_place", at=1, action="kill"), N_BLOCKS),
}

CASES = [("mem", "capture"), ("mem", "first_pass"), ("mem", "later_pass_mem"), ("mem", "shard_write_mem"),
         ("mem", "before_unmark"), ("mem", "before_rename"),
         ("st", "capture"), ("st", "first_pass"), ("st", "later_pass_st"), ("st", "block_shard_write_st"),
         ("st", "artifact_link_st"), ("st", "before_unmark"), ("st", "before_rename")]


@pytest.mark.parametrize("path, phase", CASES)
def test_killed_run_leaves_nothing_loadable_and_the_rerun_writes_the_same_artifact(
        server, refs, tiny_zoo_dir, tmp_path, path, phase):
    (kw, resumes) = KILLS[phase]
    recipe = recipe_in(tmp_path / "job", tiny_zoo_dir, streaming=path == "st")
    art = tmp_path / "job" / "art"
    killed = server.run(run_argv(recipe), hook=hook(flags=tmp_path / "flags", **kw))
    assert killed.rc == -9 and killed.fired is not None, f"the hook did not kill the run at {phase}: {killed}"
    if kw["action"] == "truncate_kill":       # the shard being written is cut, inside the run's own temp dirs
        assert ".art.tmp-incomplete-" in killed.fired["path"] or "art.work" in killed.fired["path"], killed.fired
    gaps = []

    # (a) no output; nothing left loads
    assert not art.exists()
    with pytest.raises(ArtifactError, match="directory missing"):
        dicompress.load(art)
    assert cli("verify", art).exit_code == 3
    left = temp_dirs(art)
    for d in left:
        if (d / MARKER_NAME).exists() or not (d / CONFIG_NAME).exists():
            gaps += refuse_all(d)
        else:       # killed between the unmark and the rename: the verified artifact, under its temp name
            assert phase == "before_rename", d
            refused_by_name(d, art)
            assert_identical(refs[path], d)
    if phase in ("artifact_link_st", "shard_write_mem", "before_unmark", "before_rename"):
        assert left, "the kill during the write should have left the temp directory to clean up"

    # (b) the lock is free (its file may remain, naming the dead run)
    if lock_path(art).exists():
        assert lock_path(art).read_text().strip() == str(killed.pid)
    lock_is_free(art)

    # (c) the same command completes and writes the uninterrupted run's artifact, resuming finished blocks
    again = server.run(run_argv(recipe))
    ok(again)
    assert_identical(refs[path], art)
    if path == "st":
        assert resumed_blocks(art) == resumes, again.output[-2000:]
    if phase == "capture":                    # the interrupted capture was taken again, not reused
        assert "calibration: reusing" not in again.output
        assert list((tmp_path / "job" / "cache" / "calib").glob("*/meta.json"))
    dicompress.load(art, verify=True)

    # (d) nothing of the dead run remains
    assert not (tmp_path / "job" / "art.work").exists() and not lock_path(art).exists()
    stale = temp_dirs(art)
    if stale:
        gaps.append(f"after the rerun {[d.name for d in stale]} remain beside the output")
    assert not gaps, gaps


def exchange_supported(d: Path) -> bool:
    from dicompress.io.writer import _exchange
    (d / "x").mkdir(parents=True)
    (d / "y").mkdir()
    return _exchange(d / "x", d / "y")


@pytest.mark.parametrize("when", ["kill", "kill_after"])
def test_overwrite_killed_at_the_exchange_leaves_the_old_or_the_new_artifact(server, refs, tiny_zoo_dir, tmp_path,
                                                                              when):
    """With --overwrite the new artifact and the old one swap places in one step (renameat2 RENAME_EXCHANGE): a
    kill just before it leaves the old artifact at the output, just after it the new one; the other lies in an
    unmarked temp directory that dicompress refuses and the rerun removes."""
    if not exchange_supported(tmp_path / "probe"):
        pytest.skip("this file system cannot exchange two directories (renameat2 RENAME_EXCHANGE)")
    recipe = recipe_in(tmp_path / "job", tiny_zoo_dir, streaming=False)
    art = tmp_path / "job" / "art"
    shutil.copytree(refs["st"], art)                 # the old artifact: another layout, easy to tell apart
    killed = server.run(run_argv(recipe, "--overwrite"),
                        hook=hook("dicompress.io.writer:_exchange", 1, when, tmp_path / "flags"))
    assert killed.rc == -9 and killed.fired is not None, killed
    (at_output, aside) = (refs["st"], refs["mem"]) if when == "kill" else (refs["mem"], refs["st"])
    assert_identical(at_output, art)
    dicompress.load(art, verify=True)
    left = temp_dirs(art)
    assert len(left) == 1 and not (left[0] / MARKER_NAME).exists(), left
    assert_identical(aside, left[0])
    refused_by_name(left[0], art)
    lock_is_free(art)
    ok(server.run(run_argv(recipe, "--overwrite")))
    assert_identical(refs["mem"], art)
    assert not temp_dirs(art)


# ------------------------------------------------------------------------------------------------ 2. concurrent runs
@pytest.mark.parametrize("path", ["mem", "st"])
def test_second_run_on_the_same_output_exits_at_once_and_the_first_finishes(server, refs, tiny_zoo_dir, tmp_path,
                                                                            path):
    recipe = recipe_in(tmp_path / "job", tiny_zoo_dir, streaming=path == "st")
    art = tmp_path / "job" / "art"
    flags = tmp_path / "flags"
    first = server.start(run_argv(recipe), hook=hook(f"{WQ}:gptq_codes", 5, "pause", flags))
    try:
        deadline = time.monotonic() + 120
        while not (flags / "fired.json").exists():        # the first run is inside the tlq pass, holding the lock
            assert time.monotonic() < deadline, "the first run never reached its pause"
            time.sleep(0.05)
        before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "job").rglob("*"))
        t0 = time.monotonic()
        second = server.run(run_argv(recipe))
        assert time.monotonic() - t0 < 20
        assert second.rc == 3, second
        assert second.output.startswith(f"error: another dicompress run (pid {first.pid}) is writing {art}"), second
        assert "hint:" in second.output and "Traceback" not in second.output
        after = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "job").rglob("*"))
        assert after == before                               # the second run touched nothing of the first's
        assert json.loads(lock_path(art).read_text()) == first.pid
    finally:
        (flags / "go").write_text("")
    ok(first.wait())
    assert_identical(refs[path], art)
    assert not lock_path(art).exists() and not temp_dirs(art) and not (tmp_path / "job" / "art.work").exists()


# ------------------------------------------------------------------------------------------------ 3. unwritable places
@pytest.mark.parametrize("path, target, path_arg", [
    ("mem", "safetensors.torch:save_file", 1),            # diffusers' save_pretrained writing the shard
    ("st", "dicompress.io.writer:_write_bytes", 0),       # the index, after the shards were linked
])
def test_disk_full_during_the_artifact_write(server, refs, tiny_zoo_dir, tmp_path, path, target, path_arg):
    recipe = recipe_in(tmp_path / "job", tiny_zoo_dir, streaming=path == "st")
    art, work = tmp_path / "job" / "art", tmp_path / "job" / "art.work"
    full = server.run(run_argv(recipe), hook=hook(target, 1, "enospc", tmp_path / "flags", path_arg=path_arg))
    assert full.fired is not None and ".art.tmp-incomplete-" in full.fired["path"], full
    assert full.rc == 3, full
    assert full.output.startswith(f"error: cannot write the artifact {art}: No space left on device"), full
    assert "nothing was written" in full.output and "hint: free space" in full.output, full
    assert "Traceback" not in full.output
    assert not art.exists() and not temp_dirs(art) and not lock_path(art).exists()      # nothing half-written
    if path == "st":      # finished blocks are kept for the rerun
        assert len(list((work / "stream" / "records").glob("*.json"))) == N_BLOCKS
    else:
        assert not work.exists()
    again = server.run(run_argv(recipe))
    ok(again)
    assert_identical(refs[path], art)
    if path == "st":
        assert resumed_blocks(art) == N_BLOCKS


@pytest.fixture
def ro(server):
    if server.ro_mode is None:
        pytest.skip("no way to make a directory read-only for this process: root ignores file modes, and "
                    "`unshare -rm` (a user + mount namespace for a read-only bind mount) is not permitted here")
    return server.ro_mode


def nothing_written(job: Path, art: Path) -> None:
    assert not art.exists() and not temp_dirs(art) and not lock_path(art).exists()
    assert not art.with_name(art.name + ".work").exists()


def test_read_only_output_directory(server, ro, tiny_zoo_dir, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    recipe = recipe_in(tmp_path / "job", tiny_zoo_dir, streaming=True, output=str(parent / "art"))
    r = server.run(run_argv(recipe), ro=[parent])
    assert r.rc == 3, r
    assert r.output.startswith(f"error: cannot write beside the output {parent / 'art'}") and "hint:" in r.output, r
    assert "Traceback" not in r.output
    assert list(parent.iterdir()) == []
    nothing_written(tmp_path / "job", parent / "art")


def test_read_only_calibration_cache(server, ro, tiny_zoo_dir, tmp_path):
    recipe = recipe_in(tmp_path / "job", tiny_zoo_dir, streaming=True)
    cache = tmp_path / "job" / "cache"
    cache.mkdir()
    r = server.run(run_argv(recipe), ro=[cache])
    assert r.rc == 2, r
    assert r.output.startswith(f"error: the calibration cache {cache / 'calib'} is not writable"), r
    assert "cache_dir" in r.output and "Traceback" not in r.output
    assert list(cache.iterdir()) == []
    nothing_written(tmp_path / "job", tmp_path / "job" / "art")


def test_read_only_cache_holding_the_capture_is_reused(server, ro, refs, tiny_zoo_dir, tmp_path):
    recipe = recipe_in(tmp_path / "job", tiny_zoo_dir, streaming=True)
    cache = tmp_path / "job" / "cache"
    ok(server.run(run_argv(recipe, "--output", tmp_path / "job" / "first")))      # fills the cache
    r = server.run(run_argv(recipe), ro=[cache])
    ok(r)
    assert "calibration: reusing" in r.output
    assert_identical(refs["st"], tmp_path / "job" / "art")


# ------------------------------------------------------------------------------------------------ 4. rot on disk
def one_of_each_kind(art: Path) -> list[tuple[str, str]]:
    """(file, tensor) for the first tensor of every (file kind, name suffix, dtype) in the artifact: fp32
    weights and biases, smoothing vectors, TLQ's packed codes, grids, scales and etas, the rotation signs; the
    extra files' tensors."""
    seen, out = set(), []
    for f in sorted(art.glob("*.safetensors")):
        for key, entry in read_safetensors_header(f).items():
            kind = ("weights" if f.match(WEIGHTS_GLOB) else f.name, key.rsplit(".", 1)[-1], entry.dtype)
            if kind not in seen and entry.stop > entry.start:
                seen.add(kind)
                out.append((f.name, key))
    return out


def flip(path: Path, offset: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


@pytest.mark.parametrize("path", ["mem", "st"])
def test_a_flipped_byte_in_any_tensor_kind_or_the_index_is_refused_naming_the_file(refs, tmp_path, path):
    targets = one_of_each_kind(refs[path])
    kinds = {t.rsplit(".", 1)[-1] for f, t in targets if f.startswith("diffusion")}
    assert {"weight", "bias", "smooth", "qweight", "grid", "scales", "eta", "signs"} <= kinds, kinds
    if path == "st":
        targets.append((INDEX_NAME, None))
    for i, (name, tensor) in enumerate(targets):
        dst = tmp_path / str(i)
        shutil.copytree(refs[path], dst)
        if tensor is None:      # the last digit of the index's total_size, to another digit: still valid JSON
            text = (dst / name).read_bytes()
            start = text.index(b'"total_size": ') + len(b'"total_size": ')
            while text[start + 1:start + 2].isdigit():
                start += 1
            flip(dst / name, start, mask=0x01)
        else:
            entry = read_safetensors_header(dst / name)[tensor]
            flip(dst / name, (entry.start + entry.stop) // 2)
        for args in (("verify", dst), ("inspect", dst, "--verify")):
            r = cli(*args)
            assert r.exit_code == 3 and "Traceback" not in r.output, (name, tensor, r.output)
            assert f"{name} differs from its recorded SHA-256" in r.output, (name, tensor, r.output)
        with pytest.raises(ArtifactError, match=f"{name} differs"):
            dicompress.load(dst, verify=True)
        shutil.rmtree(dst)
