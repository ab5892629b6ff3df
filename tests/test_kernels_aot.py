"""The Triton kernels compiled for the GPU (sm_90: H100/H200; sm_86: consumer Ampere) without one, by Triton's
own compiler and its bundled ptxas (tools/aot_kernels.py, in a subprocess: the test process runs Triton's
interpreter). The interpreter runs code the GPU compiler refuses (a plain global inside a kernel did), and
says nothing of registers; this compiles every variant the library or the GPU bench can launch and checks
the machine code: no register spills in the default and sweep tiles, tensor cores (wgmma on Hopper),
pipelined loads, shared memory within a block's limit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]


SHARED_LIMIT = {90: 227 * 1024, 86: 99 * 1024}           # bytes of shared memory one block may use


@pytest.fixture(scope="module", params=[90, 86], ids=["sm90", "sm86"])
def aot(request, tmp_path_factory):
    triton = pytest.importorskip("triton")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip("this Triton build has no bundled ptxas / cuobjdump")
    out = tmp_path_factory.mktemp(f"aot{request.param}") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "aot_kernels.py"), "--out", str(out), "--arch",
                           str(request.param)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return request.param, json.loads(out.read_text())["rows"]


def test_every_kernel_variant_compiles(aot):
    _, aot = aot
    failed = [(r["kernel"], r["variant"], r["error"]) for r in aot if "error" in r]
    assert not failed
    kernels = {r["kernel"] for r in aot}
    assert {"qgemm int8", "qgemm float", "quantize_act"} <= kernels and len(aot) >= 20


def test_default_and_sweep_tiles_do_not_spill(aot):
    from dicompress.kernels.triton_gemm import TILE_CANDIDATES
    arch, aot = aot
    tiles = [r for r in aot if r["kernel"].startswith("qgemm") and not r.get("coverage")]
    assert len(tiles) == sum(len(c) for c in TILE_CANDIDATES.values())
    for r in tiles:
        assert r["stack_bytes"] == 0, f"{r['kernel']} {r['variant']} spills {r['stack_bytes']} B per thread"
        assert (r["wgmma"] if arch >= 90 else r["mma_sync"]) and r["async_copies"] > 0, r
        assert r["shared_bytes"] <= SHARED_LIMIT[arch], r
    for r in aot:
        if r["kernel"] == "quantize_act":
            assert r["stack_bytes"] == 0, r


def test_unpacked_weight_streams_through_the_copy_pipeline(aot):
    """Mode int8_unpacked's point: with no decode between load and dot, both operands of every stage arrive by
    asynchronous copies (the table paths copy the activations alone and store the decoded weight from
    registers)."""
    from dicompress.kernels.triton_gemm import _blocks
    _, aot = aot
    rows = [r for r in aot if r["kernel"] == "qgemm int8_unpacked"]
    assert rows
    for r in rows:
        stages = dict(_blocks(4096, 0, "int8_unpacked"), **(r["variant"] if isinstance(r["variant"], dict) else {}))
        assert r["async_copies"] == 2 * stages["num_stages"], r
    table = next(r for r in aot if r["kernel"] == "qgemm int8" and r["variant"] == "default")
    assert table["async_copies"] == _blocks(4096, 0, "int8")["num_stages"]
