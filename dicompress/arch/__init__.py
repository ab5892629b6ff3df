"""Architecture adapters: one file per model family."""
from .base import ARCHS, ArchAdapter, BlockRef, adapter_for, adapter_for_class, register_arch, supported_classes

__all__ = ["ARCHS", "ArchAdapter", "BlockRef", "adapter_for", "adapter_for_class", "register_arch", "supported_classes"]
