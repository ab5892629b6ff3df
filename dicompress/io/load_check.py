"""The write-time check is the user's load: before an artifact is renamed into place it is loaded the way users
load it (diffusers' `from_pretrained` through the registered quantizer) and must reproduce what the model in
memory computed.

What the model in memory computed is kept as *probes*: a module's name, the positional and keyword arguments of
one call of it, and its output (`record_probes`, with forward hooks). The caller picks them: the in-memory path
probes the whole model (name "") and its first and last blocks on the architecture's small synthetic inputs; the
streaming path probes the first and last blocks on one row of their calibration inputs while each is in memory
(kept in the work directory, so a resumed run still has them).

`check_as_loaded` loads the artifact whole when its weights are at most `whole_load_bytes`, else one probed
block at a time (a meta model rebuilt by the same quantizer hook `from_pretrained` runs, and only that block's
tensors read), calls each probed module with the recorded arguments and compares outputs.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ArtifactError
from .names import INDEX_NAME, WEIGHTS_NAME

WHOLE_LOAD_BYTES = 2 * 2**30      # above this the check loads one probed block at a time, not the whole model
RTOL = 1e-3                       # of the reference's largest magnitude: a wrong module or weight is O(1) off


@dataclass
class LoadCheck:
    """What the writer checks before the rename (`probes`, loaded in `dtype` on `device`); it sets `result` (the
    report's `load_check`)."""
    probes: list["Probe"]
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    whole_load_bytes: int = WHOLE_LOAD_BYTES
    result: dict | None = None

    def run(self, root: Path) -> dict:
        self.result = check_as_loaded(root, self.probes, dtype=self.dtype, device=self.device,
                                      whole_load_bytes=self.whole_load_bytes)
        return self.result


@dataclass
class Probe:
    module: str          # "" = the whole model
    args: tuple
    kwargs: dict
    output: Any          # tensors, tuples / lists / dicts of them, as the module returned it


@torch.no_grad()
def record_probes(model: nn.Module, names: list[str], run: Callable[[], Any]) -> list[Probe]:
    """Run `run()` with hooks on the modules `names` of `model`; each one's first call becomes a Probe (inputs and
    outputs detached onto the CPU)."""
    got: dict[str, Probe] = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            if name not in got:
                got[name] = Probe(name, _cpu(args), _cpu(kwargs), _cpu(output))
        return fn

    with ExitStack() as stack:
        for name in dict.fromkeys(names):
            h = model.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True)
            stack.callback(h.remove)
        run()
    return [got[n] for n in dict.fromkeys(names) if n in got]


def _cpu(value):
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if hasattr(value, "to_tuple"):        # diffusers' ModelOutput
        return _cpu(value.to_tuple())
    return value


def _to(value, device, dtype):
    """Recorded inputs onto the loaded module's device; floating tensors in its compute dtype."""
    if torch.is_tensor(value):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


# ---- kept on disk (the streaming work directory): tensors in safetensors, the structure as JSON ----

def save_probes(path: Path, probes: list[Probe]) -> None:
    tensors: dict[str, torch.Tensor] = {}

    def enc(v):
        if torch.is_tensor(v):
            key = f"t{len(tensors)}"
            tensors[key] = v.contiguous()
            return {"tensor": key}
        if isinstance(v, (tuple, list)):
            return {"tuple" if isinstance(v, tuple) else "list": [enc(x) for x in v]}
        if isinstance(v, dict):
            return {"dict": {str(k): enc(x) for k, x in v.items()}}
        if v is None or isinstance(v, (bool, int, float, str)):
            return {"value": v}
        raise TypeError(f"a probe cannot keep a {type(v).__name__}")

    skeleton = [{"module": p.module, "args": enc(p.args), "kwargs": enc(p.kwargs), "output": enc(p.output)}
                for p in probes]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path.with_suffix(".tmp")), metadata={"probes": json.dumps(skeleton)})
    os.replace(path.with_suffix(".tmp"), path)


def load_probes(path: Path) -> list[Probe]:
    with safe_open(str(path), "pt") as f:
        skeleton = json.loads(f.metadata()["probes"])
    tensors = load_file(str(path))

    def dec(v):
        kind, x = next(iter(v.items()))
        if kind == "tensor":
            return tensors[x]
        if kind in ("tuple", "list"):
            items = [dec(i) for i in x]
            return tuple(items) if kind == "tuple" else items
        if kind == "dict":
            return {k: dec(i) for k, i in x.items()}
        return x

    return [Probe(s["module"], dec(s["args"]), dec(s["kwargs"]), dec(s["output"])) for s in skeleton]


# ---- the check ----

def check_as_loaded(root: Path, probes: list[Probe], *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", whole_load_bytes: int = WHOLE_LOAD_BYTES) -> dict:
    """Load the artifact at `root` as users do and rerun every probe; ArtifactError naming the module whose
    output differs. Returns what was checked (the report's `load_check`)."""
    from .loader import load     # the user's entry point (verify, then from_pretrained)
    weights = _weight_bytes(root)
    whole = weights <= whole_load_bytes
    probes = sorted(probes, key=lambda p: not p.module)     # blocks first: a failure names the narrowest module
    rows = []
    if whole:
        model = load(root, device=device, torch_dtype=dtype)
        rows = [_compare(p, model.get_submodule(p.module), device, dtype) for p in probes]
        del model
    else:
        for p in probes:
            if p.module:                  # the whole model is not loaded at this size
                rows.append(_compare(p, load_module(root, p.module, dtype, device), device, dtype))
    return {"loaded": "whole model" if whole else "one block at a time", "weight_bytes": weights,
            "probes": rows, "skipped": [p.module or "(whole model)" for p in probes if not whole and not p.module]}


@torch.no_grad()
def _compare(p: Probe, module: nn.Module, device, dtype) -> dict:
    got = _cpu(module(*_to(p.args, device, dtype), **_to(p.kwargs, device, dtype)))
    want, have = _leaves(p.output), _leaves(got)
    where = p.module or "the whole model"
    if len(want) != len(have) or any(a.shape != b.shape for a, b in zip(want, have)):
        raise ArtifactError(f"the artifact as loaded by from_pretrained does not compute what the model in memory "
                            f"did: {where} returns {[tuple(t.shape) for t in have]}, expected "
                            f"{[tuple(t.shape) for t in want]}; nothing was written",
                            hint="a bug in a pass's manifest entries or in the loader; please report it")
    diff = max((float((a.float() - b.float()).abs().max()) if a.numel() else 0.0) for a, b in zip(want, have))
    scale = max((float(a.float().abs().max()) if a.numel() else 0.0) for a in want)
    if not diff <= RTOL * max(scale, 1e-30):       # `not <=`: a NaN fails too
        raise ArtifactError(f"the artifact as loaded by from_pretrained does not compute what the model in memory "
                            f"did: {where} differs by {diff:.3g} (largest output magnitude {scale:.3g}); nothing "
                            "was written", hint="a bug in a pass's manifest entries or in the loader; please report it")
    return {"module": p.module or "(whole model)", "max_abs_diff": diff,
            "bit_exact": all(torch.equal(a, b) for a, b in zip(want, have))}


def _leaves(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _leaves(value[k])]
    return []


def _weight_map(root: Path) -> dict[str, str]:
    if (root / INDEX_NAME).is_file():
        return json.loads((root / INDEX_NAME).read_text())["weight_map"]
    with safe_open(str(root / WEIGHTS_NAME), "pt") as f:
        return {k: WEIGHTS_NAME for k in f.keys()}


def _weight_bytes(root: Path) -> int:
    return sum((root / f).stat().st_size for f in set(_weight_map(root).values()))


def load_module(root: Path, name: str, dtype: torch.dtype, device) -> nn.Module:
    """One module of the artifact as `from_pretrained` would give it, without reading the rest: the meta model
    rebuilt by the registered quantizer's own hook, then only this module's tensors, with the loader's dtype rule
    (codec buffers keep their stored dtype, everything else takes `dtype`)."""
    from .diffusers_plugin import DicompressConfig, DicompressQuantizer, _realign_cpu_tensors
    from .verify import meta_model, read_config
    config = read_config(root)
    quantizer = DicompressQuantizer(DicompressConfig.from_dict(config["quantization_config"]), pre_quantized=True)
    model = quantizer.preprocess_model(meta_model(config, replayed=False))
    module = model.get_submodule(name)
    prefix = name + "."
    wanted = {k: f for k, f in _weight_map(root).items() if k.startswith(prefix)}
    for fname in sorted(set(wanted.values())):
        with safe_open(str(root / fname), "pt") as f:
            for key in (k for k, v in wanted.items() if v == fname):
                t = f.get_tensor(key)
                if not quantizer.check_if_quantized_param(model, t, key, {}) and t.is_floating_point():
                    t = t.to(dtype)
                _assign(module, key[len(prefix):], t.to(device))
    missing = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if missing:
        raise ArtifactError(f"{root}: {name} has {len(missing)} tensors not in the weights, e.g. {missing[:3]}",
                            hint="a bug in a pass's manifest entries or in the writer; please report it")
    _realign_cpu_tensors(module)
    return module.eval()


def _assign(module: nn.Module, key: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value

