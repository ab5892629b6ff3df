"""How captured values are kept: nested tensors flattened to safetensors keys and back, non-tensor forward
kwargs as JSON (tuples kept apart from lists), which kwargs are per sample, and stored tensors placed back on a
module's device and dtype. Pure functions; the store (store.py) and the capture (capture.py) use them."""
from __future__ import annotations

import torch


def flatten(name: str, value, out: dict) -> None:
    """Tensors, tuples of tensors and complex tensors -> flat safetensors-friendly dict."""
    if value is None:
        return
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            flatten(f"{name}.{i}", v, out)
    elif torch.is_complex(value):
        out[f"{name}.complex"] = torch.view_as_real(value).contiguous()
    else:
        out[name] = value.contiguous()


def unflatten(flat: dict[str, torch.Tensor]) -> dict:
    """Inverse of `flatten` (tuples rebuilt in index order)."""
    out: dict = {}
    tuples: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in flat.items():
        if key.endswith(".complex"):
            key, t = key[: -len(".complex")], torch.view_as_complex(t)
        base, _, idx = key.rpartition(".")
        if base and idx.isdigit():
            tuples.setdefault(base, {})[int(idx)] = t
        else:
            out[key] = t
    for base, parts in tuples.items():
        out[base] = tuple(parts[i] for i in sorted(parts))
    return out


def to_module(value, device: torch.device, dtype: torch.dtype, cast: bool = True):
    """Captured tensors (and tuples / dicts of them) on a module's device; float tensors take its dtype when
    `cast` (captures are stored in fp32), integer tensors (masks, ids) keep theirs."""
    if isinstance(value, tuple):
        return tuple(to_module(v, device, dtype, cast) for v in value)
    if isinstance(value, dict):
        return {k: to_module(v, device, dtype, cast) for k, v in value.items()}
    if not torch.is_tensor(value):
        return value
    if cast and value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device)


def shared_input_names(adapter) -> tuple[str, ...]:
    return tuple(adapter.model_shared_inputs)


def split_model_input(name: str, value, batch: int, shared_names=()) -> str:
    """'per_sample' or 'shared' for one model forward kwarg (the rule in calib/store.py's docstring)."""
    if name in shared_names:
        return "shared"
    if torch.is_tensor(value):
        return "per_sample" if value.ndim == 0 or value.shape[0] == batch else "shared"
    if isinstance(value, list) and len(value) == batch:
        return "per_sample"
    return "shared"


def encode_value(v):
    """JSON-able form of a non-tensor kwarg that keeps tuples apart from lists (diffusers tells them apart)."""
    if isinstance(v, tuple):
        return {"__tuple__": [encode_value(x) for x in v]}
    if isinstance(v, list):
        return [encode_value(x) for x in v]
    if isinstance(v, dict):
        return {"__dict__": {str(k): encode_value(x) for k, x in v.items()}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store a {type(v).__name__}")


def decode_value(v):
    if isinstance(v, list):
        return [decode_value(x) for x in v]
    if isinstance(v, dict):
        if "__tuple__" in v:
            return tuple(decode_value(x) for x in v["__tuple__"])
        return {k: decode_value(x) for k, x in v["__dict__"].items()}
    return v
