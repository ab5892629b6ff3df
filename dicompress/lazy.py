"""Package attributes imported from their modules on first use (PEP 562), so importing a package for one light
name does not import its heavy siblings (diffusers' pipelines and quantizers take seconds). A leaf module."""
from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """(__getattr__, __dir__) for `package` whose names in `exports` (name -> submodule) load on first access
    and are then cached in the package's `namespace` (its globals())."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))
    return __getattr__, __dir__
