"""Module surgery in one place: find, replace and select submodules by dotted name."""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Iterator

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace `model.<name>` by `new`; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def matches(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch against the full dotted name (`proj_out` matches only the top-level proj_out)."""
    return any(fnmatchcase(name, p) for p in patterns)


def iter_linears(model: nn.Module, include: Iterable[str], exclude: Iterable[str] = ()) -> Iterator[tuple[str, nn.Linear]]:
    """Plain nn.Linear modules whose names match `include` and none of `exclude`, in model order."""
    include, exclude = list(include), list(exclude)
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and matches(name, include) and not matches(name, exclude):
            yield name, mod
