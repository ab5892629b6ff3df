"""DICOMPRESS_GEMM_MODE=auto (the default): decode on CUDA; on CPU int8 only where the int8 GEMM beats the
fp32 matmul, decided from the CPU capability and a one-off probe (both mocked here), resolved before the ops."""
import pytest
import torch

from dicompress.kernels import dispatch, gemm_mode, ops, reference
from dicompress.nn.act import ActTransform
from dicompress.nn.qlinear import QuantLinear
from dicompress.quant.tlq import tlq_quantize

K, N = 32, 12


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """No setting from the environment, no cached choice, no GPU in sight (describe's CPU advice)."""
    for var in ("DICOMPRESS_GEMM_MODE", "DICOMPRESS_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dispatch._resolve_cpu_mode.cache_clear()
    yield
    dispatch._resolve_cpu_mode.cache_clear()


def cpu(monkeypatch, capability: str, speedup: float | None = None, vnni: bool = False) -> list[int]:
    """Mock the CPU: its dispatch capability, VNNI, and the probe's answer (None: the probe must not run).
    Returns a list that counts the probe's calls."""
    calls = []

    def probe():
        calls.append(1)
        if speedup is None:
            raise AssertionError("probed on a CPU whose capability decides")
        return speedup
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(dispatch, "probe_int8_speedup", probe)
    return calls


def layer(act_bits=8, group=None, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    codes, buffers, _ = tlq_quantize(lin.weight.detach(), 4, group, etas=(0.0, 0.02), percentiles=(0.99, 1.0),
                                     bottoms=(0.0,))
    act = ActTransform(K, act_bits=act_bits) if act_bits else None
    return QuantLinear.from_linear_codes(lin, codes, buffers, "tlq", 4, group, act=act).eval()


# -- the choice ------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT", "NO AVX"])
def test_x86_below_avx512_gets_decode_without_a_probe(monkeypatch, capability):
    calls = cpu(monkeypatch, capability)
    mode, why = dispatch.resolve_cpu_mode()
    assert mode == "decode" and capability in why and "no probe" in why
    assert dispatch.current_mode("cpu") == "decode" and calls == []


def test_avx2_describe_gives_no_int8_hint_and_warns_when_int8_is_forced(monkeypatch):
    cpu(monkeypatch, "AVX2")
    text = dispatch.describe()
    assert "cpu: auto picks decode: cpu capability AVX2" in text and "mode now: decode on CPU" in text
    assert "hint:" not in text and "DICOMPRESS_GEMM_MODE=int8" not in text
    monkeypatch.setenv("DICOMPRESS_GEMM_MODE", "int8")
    text = dispatch.describe()
    assert "warning: DICOMPRESS_GEMM_MODE=int8 on this CPU" in text and "hint:" not in text


@pytest.mark.parametrize("speedup, expected", [(6.0, "int8"), (1.3, "int8"), (1.1, "decode"), (0.02, "decode")])
def test_avx512_follows_the_probe(monkeypatch, speedup, expected):
    calls = cpu(monkeypatch, "AVX512", speedup, vnni=True)
    mode, why = dispatch.resolve_cpu_mode()
    assert mode == expected and calls == [1]
    assert "AVX512 (VNNI yes, AMX no)" in why and f"{speedup:.2f}x the fp32 matmul" in why
    assert dispatch.current_mode("cpu") == expected


def test_the_probe_runs_once_per_thread_count(monkeypatch):
    calls = cpu(monkeypatch, "AVX512", 5.0, vnni=True)
    threads = torch.get_num_threads()
    for _ in range(3):
        assert dispatch.resolve_cpu_mode()[0] == "int8"
    assert calls == [1]
    try:
        torch.set_num_threads(threads + 1)                  # the ratio may change with threads: probe again
        dispatch.resolve_cpu_mode()
    finally:
        torch.set_num_threads(threads)
    assert calls == [1, 1]


def test_a_failing_probe_means_decode(monkeypatch):
    cpu(monkeypatch, "SVE256")

    def broken():
        raise RuntimeError("_int_mm not implemented")
    monkeypatch.setattr(dispatch, "probe_int8_speedup", broken)
    mode, why = dispatch.resolve_cpu_mode()
    assert mode == "decode" and "probe failed" in why and "not implemented" in why


def test_avx512_vnni_describe_hints_only_when_decode_is_forced(monkeypatch):
    cpu(monkeypatch, "AVX512", 6.0, vnni=True)
    text = dispatch.describe()
    assert "cpu: auto picks int8" in text and "mode now: int8 on CPU" in text and "hint:" not in text
    monkeypatch.setenv("DICOMPRESS_GEMM_MODE", "decode")
    assert "hint: on this CPU, DICOMPRESS_GEMM_MODE=int8" in dispatch.describe()


def test_the_real_probe_is_a_ratio():
    """The unmocked probe on this machine: a positive finite ratio (its value is the machine's)."""
    speedup = dispatch.probe_int8_speedup()
    assert 0 < speedup < float("inf")


# -- explicit settings -----------------------------------------------------------------------------
def test_explicit_int8_still_forces_int8_on_avx2(monkeypatch):
    cpu(monkeypatch, "AVX2")
    q, x = layer(), torch.randn(5, K)
    with torch.no_grad():
        with gemm_mode("int8"):
            forced = q(x)
        auto = q(x)
        monkeypatch.setenv("DICOMPRESS_GEMM_MODE", "int8")
        assert dispatch.current_mode("cpu") == "int8" and dispatch.current_mode("cpu", int8_gemm=False) == "int8"
        assert torch.equal(q(x), forced)
    assert not torch.equal(auto, forced)                    # auto took decode: the exact levels


@pytest.mark.parametrize("value", ["int4", "fastest"])
def test_bad_values_name_the_variable(monkeypatch, value):
    monkeypatch.setenv("DICOMPRESS_GEMM_MODE", value)
    for call in (dispatch.check_settings, dispatch.current_mode, dispatch.describe):
        with pytest.raises(ValueError, match=f"DICOMPRESS_GEMM_MODE={value!r}"):
            call()


def test_auto_is_a_setting_not_a_kernel_mode(monkeypatch):
    monkeypatch.setenv("DICOMPRESS_GEMM_MODE", "AUTO")      # case and the explicit spelling are accepted
    dispatch.check_settings()
    with pytest.raises(ValueError, match="current_mode"):
        dispatch.check_mode("auto")
    with pytest.raises(ValueError, match="GEMM mode 'int4'"), gemm_mode("int4"):
        pass


# -- what reaches the kernels ----------------------------------------------------------------------
def _record_modes(monkeypatch) -> dict[str, list[str]]:
    """Wrap the op and the differentiable reference that linear.py calls; collect the mode each receives (the
    op's CPU kernel calls the reference too: those calls land in "reference" as well)."""
    seen = {"op": [], "reference": []}
    for key, owner in (("op", ops), ("reference", reference)):
        real = owner.qlinear

        def spy(*args, _real=real, _key=key):
            seen[_key].append(args[10])
            return _real(*args)
        monkeypatch.setattr(owner, "qlinear", spy)
    return seen


@pytest.mark.parametrize("capability, speedup, a8_mode", [("AVX512", 6.0, "int8"), ("AVX2", None, "decode")])
def test_the_kernels_never_receive_auto(monkeypatch, capability, speedup, a8_mode):
    cpu(monkeypatch, capability, speedup, vnni=True)
    seen = _record_modes(monkeypatch)
    x = torch.randn(4, K)
    with torch.no_grad():
        layer()(x)                                          # 8-bit codes, per channel: the int8 GEMM's call
        layer(act_bits=None)(x)                             # A16: int8 would only be the lossy reference
        layer(group=16)(x)                                  # group scales: torch._int_mm cannot apply them
    assert seen["op"] == [a8_mode, "decode", "decode"]
    seen["reference"].clear()
    layer()(x.requires_grad_(True))                         # the differentiable path: the reference alone
    assert seen["reference"] == ["decode"] and len(seen["op"]) == 3
    assert dispatch.current_mode("cuda") == dispatch.current_mode(torch.device("meta")) == "decode"


def test_auto_gives_int8_values_where_it_picks_int8(monkeypatch):
    cpu(monkeypatch, "AVX512", 6.0, vnni=True)
    q, x = layer(), torch.randn(6, K)
    with torch.no_grad():
        auto = q(x)
        with gemm_mode("int8"):
            int8 = q(x)
        with gemm_mode("decode"):
            decode = q(x)
    assert torch.equal(auto, int8) and not torch.equal(auto, decode)


def test_reference_kernels_make_auto_decode(monkeypatch):
    cpu(monkeypatch, "AVX512", 6.0, vnni=True)
    monkeypatch.setenv("DICOMPRESS_KERNELS", "reference")   # no torch._int_mm: int8 would only cost accuracy
    assert dispatch.current_mode("cpu") == "decode"


def test_compiled_auto_resolves_at_trace_time(monkeypatch):
    """torch.compile keeps auto's choice as a constant: one graph (no break at the probe), int8's values."""
    calls = cpu(monkeypatch, "AVX512", 6.0, vnni=True)
    q, x = layer(), torch.randn(2, 3, K)
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
        with gemm_mode("int8"):
            assert torch.equal(out, q(x))
    assert calls == [1]
    torch._dynamo.reset()


# -- the run report names the mode its latency was measured in -------------------------------------
def _fake_latency(monkeypatch) -> list[str]:
    """latency_ms_per_step that records the mode the CPU's int8-GEMM layers run at the time it is called."""
    from dicompress.eval import digits_eval
    modes = []

    def fake(model, conditioning):
        modes.append(dispatch.current_mode("cpu"))
        return {"decode": 10.0, "int8": 4.0}[modes[-1]]
    monkeypatch.setattr(digits_eval, "latency_ms_per_step", fake)
    return modes


@pytest.mark.parametrize("capability, speedup, mode", [("AVX2", None, "decode"), ("AVX512", 6.0, "int8")])
def test_latency_metrics_name_the_mode_measured(monkeypatch, capability, speedup, mode):
    from dicompress.eval.digits_eval import latency_metrics
    cpu(monkeypatch, capability, speedup, vnni=True)
    modes = _fake_latency(monkeypatch)
    out = latency_metrics(torch.nn.Sequential(layer()), torch.nn.Linear(K, N), conditioning=None)
    assert out["latency_gemm_mode"] == mode and out["latency_ms_per_step"] == {"decode": 10.0, "int8": 4.0}[mode]
    if mode == "decode":                                    # the int8 GEMM, forced, measured beside it
        assert out["latency_ms_per_step_int8"] == 4.0 and modes == ["decode", "decode", "int8"]
    else:                                                   # already measured in int8: not twice
        assert "latency_ms_per_step_int8" not in out and modes == ["int8", "int8"]


def test_latency_metrics_without_quantized_linears_name_no_mode(monkeypatch):
    from dicompress.eval.digits_eval import latency_metrics
    cpu(monkeypatch, "AVX2")
    _fake_latency(monkeypatch)
    out = latency_metrics(torch.nn.Linear(K, N), torch.nn.Linear(K, N), conditioning=None)
    assert "latency_gemm_mode" not in out and "latency_ms_per_step_int8" not in out


def test_summary_labels_the_latency_lines():
    from dicompress.eval.summary import format_summary
    metrics = {"latency_ms_per_step": 10.0, "latency_ms_per_step_teacher": 5.0, "latency_ratio": 2.0,
               "latency_gemm_mode": "decode", "latency_ms_per_step_int8": 4.0}
    lines = format_summary({"metrics": metrics}).splitlines()
    assert [line.split()[-2:] for line in lines if "latency ms/step (GEMM mode decode)" in line] == [["10.00", "5.00"]]
    assert [line.split()[-2:] for line in lines if "latency ms/step, forced GEMM mode int8" in line] == [["4.00", "-"]]
    assert not [line for line in lines if "latency_gemm_mode" in line]      # a label, not a row of its own
