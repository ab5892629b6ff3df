"""Every broken input a user can hand the CLI: a named error, the documented exit code (errors.py), no
traceback, and nothing written (no output, no `<output>.work/`, no lock file)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dicompress import paths
from dicompress.cli import main
from dicompress.errors import CalibrationError
from dicompress.runlock import lock_path, output_lock

CAL = {"source": "classes", "classes": [0, 5], "seeds": [0], "steps": 2, "batch_size": 2}


def recipe(tmp_path: Path, model, **over) -> Path:
    data = {"model": str(model), "calibration": dict(CAL), "passes": [{"tlq": {"bits": 4}}],
            "output": str(tmp_path / "art"), "eval": {"enabled": False}}
    for key, value in over.items():
        if key.startswith("cal_"):
            data["calibration"][key[4:]] = value
        else:
            data[key] = value
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def invoke(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=False)


def nothing_written(out: Path) -> bool:
    leftovers = [out, out.with_name(out.name + ".work"), lock_path(out)]
    return not any(p.exists() for p in leftovers) and not list(out.parent.glob(f".{out.name}.tmp-*"))


def check(r, code: int, *needles: str, out: Path | None = None):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.output.startswith("error: ")
    for n in needles:
        assert n in r.output, r.output
    if out is not None:
        assert nothing_written(out)


@pytest.mark.parametrize("over, key", [
    ({"cal_steps": 2000}, "calibration.steps"), ({"cal_seeds": []}, "calibration.seeds"),
    ({"cal_seeds": [-1]}, "calibration.seeds[0]"), ({"cal_classes": []}, "calibration.classes"),
    ({"cal_classes": [0, -2]}, "calibration.classes[1]"), ({"cal_batch_size": 0}, "calibration.batch_size"),
    ({"cal_height": 100}, "calibration.height"), ({"cal_width": 100000}, "calibration.width"),
    ({"cal_guidance_scale": -1.0}, "calibration.guidance_scale"), ({"passes": []}, "passes"),
    ({"eval": {"samples_per_class": 0}}, "eval.samples_per_class"), ({"seed": -1}, "seed"),
    ({"cal_classes": [0, 12]}, "calibration.classes"),        # beyond the model's class table (10 rows)
])
def test_out_of_range_recipe_values(tmp_path, tiny_zoo_dir, over, key):
    r = invoke("run", recipe(tmp_path, tiny_zoo_dir, **over), "--quiet")
    check(r, 2, key, out=tmp_path / "art")


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\xff", "model: caf\xe9\n".encode("latin-1"),
                                     b"model: x\x00\n"])
def test_binary_or_non_utf8_recipe(tmp_path, content):
    p = tmp_path / "recipe.yaml"
    p.write_bytes(content)
    check(invoke("run", p), 2, str(p))


@pytest.mark.parametrize("config, needle", [("[1, 2]", "not a mapping"), ("{\"_class_name\": [1]}", "_class_name"),
                                            ("\xff\xfe", "unreadable")])
def test_model_config_that_is_not_a_diffusers_config(tmp_path, config, needle):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_bytes(config.encode("latin-1"))
    check(invoke("run", recipe(tmp_path, d)), 2, needle, out=tmp_path / "art")


def test_truncated_model_is_a_model_error(tmp_path, tiny_zoo_dir):
    d = tmp_path / "model"
    shutil.copytree(tiny_zoo_dir, d)
    weights = d / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    r = invoke("run", recipe(tmp_path, d), "--quiet")
    check(r, 2, "truncated", out=tmp_path / "art")
    assert "artifact" not in r.output.lower()


@pytest.mark.parametrize("source, content, needle", [
    ("prompts", b"\xff\xfe\x00p", "calibration.prompts"), ("prompts", b"# only a comment\n\n", "holds no prompts"),
    ("embeddings", b"not a safetensors file", "cannot read the class table")])
def test_unreadable_calibration_inputs(tmp_path, tiny_zoo_dir, source, content, needle):
    f = tmp_path / "inputs.bin"
    f.write_bytes(content)
    r = invoke("run", recipe(tmp_path, tiny_zoo_dir, cal_source=source, cal_classes=None, **{f"cal_{source}": str(f)}))
    check(r, 2, needle, out=tmp_path / "art")


def _unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (as root, chmod does not stop writes: /sys does)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    d = Path("/sys/dicompress-test")
    try:
        d.mkdir()
    except OSError:
        return d
    d.rmdir()
    pytest.skip("no unwritable directory for root here")


def test_unwritable_output_directory_exit_3(tmp_path, tiny_zoo_dir):
    out = _unwritable(tmp_path) / "art"
    r = invoke("run", recipe(tmp_path, tiny_zoo_dir, output=str(out)), "--quiet")
    check(r, 3, "cannot write beside the output", "hint:")
    assert not out.exists()


def test_unwritable_calibration_cache_exit_2(tmp_path, tiny_zoo_dir):
    cache = _unwritable(tmp_path) / "cache"
    r = invoke("run", recipe(tmp_path, tiny_zoo_dir, cal_cache_dir=str(cache)), "--quiet")
    check(r, 2, "calibration cache", "cache_dir", out=tmp_path / "art")


@pytest.mark.parametrize("var, value", [("DICOMPRESS_KERNELS", "fastest"), ("DICOMPRESS_GEMM_MODE", "int4")])
def test_bad_kernel_setting_fails_before_work(tmp_path, tiny_zoo_dir, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    check(invoke("run", recipe(tmp_path, tiny_zoo_dir), "--quiet"), 2, f"{var}={value!r}", out=tmp_path / "art")


@pytest.mark.parametrize("args", [["--samples-per-class", 0], ["--steps", 0], ["--samples-per-class", -3]])
def test_eval_options_out_of_range(tmp_path, args):
    r = invoke("eval", tmp_path, *args)
    assert r.exit_code == 2 and "Invalid value" in r.output and "Traceback" not in r.output


def test_early_failure_removes_the_work_dir_it_made(tmp_path, tiny_zoo_dir, monkeypatch):
    """Streaming makes `<output>.work/stream/` at load; a failure before any finished block removes it."""
    def fail(*a, **k):
        raise CalibrationError("no calibration today", hint="none")
    monkeypatch.setattr(paths, "recipe_store", fail)
    r = invoke("run", recipe(tmp_path, tiny_zoo_dir, streaming={"enabled": True}), "--quiet")
    check(r, 2, "no calibration today", out=tmp_path / "art")


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(120)
"""


def test_second_run_on_the_same_output_exits_at_once(tmp_path, tiny_zoo_dir):
    out = tmp_path / "art"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        r = invoke("run", recipe(tmp_path, tiny_zoo_dir), "--quiet")
        assert time.monotonic() - t0 < 30
        check(r, 3, f"another dicompress run (pid {holder.pid}) is writing {out}")
        assert not out.exists() and not (tmp_path / "art.work").exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out).exists()                # the killed owner left its file: stale, so it is taken
    with output_lock(out):
        assert json.loads(lock_path(out).read_text()) == os.getpid()
    assert not lock_path(out).exists()


def test_lock_is_taken_by_rank_0_only(tmp_path):
    out = tmp_path / "art"
    with output_lock(out, take=False):
        assert not lock_path(out).exists()
    with output_lock(out):               # the holder may take it again (the writer does, under a run's lock) ...
        with output_lock(out):
            assert lock_path(out).exists()
        assert lock_path(out).exists()   # ... and the inner exit leaves it held; another process: tests/test_faults.py
    assert not lock_path(out).exists()


def test_as_a_user_runs_it(tmp_path, tiny_zoo_dir):
    """The installed entry point, in its own process: message on stderr, exit code, no traceback."""
    out = _unwritable(tmp_path) / "art"
    p = subprocess.run([sys.executable, "-m", "dicompress.cli", "run", str(recipe(tmp_path, tiny_zoo_dir,
                        output=str(out))), "--quiet"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 3 and "cannot write beside the output" in p.stderr and "Traceback" not in p.stderr
