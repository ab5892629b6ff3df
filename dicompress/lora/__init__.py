"""LoRA on compressed models: peft's LoRA layers for dicompress linears, exact on the original input.

`install()` (run by `import dicompress` when peft is present) makes diffusers' `load_lora_weights`,
`add_adapter`, `set_adapters`, `unload_lora_weights` work on a dicompress transformer; `fuse_lora` is refused.
"""
from __future__ import annotations


def install() -> None:
    """Patch peft's layer dispatch and diffusers' LoRA loaders for dicompress layers (idempotent)."""
    from .hooks import install as _install
    _install()


def install_if_available() -> bool:
    """`install()` when peft can be imported (diffusers' LoRA API needs it anyway); False otherwise."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    install()
    return True


__all__ = ["install", "install_if_available"]
