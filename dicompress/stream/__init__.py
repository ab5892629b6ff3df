"""Streaming compression: models larger than memory, one block's weights at a time."""
from .checkpoint import Checkpoint, offloaded, release, skeleton
from .sweep import Sweep, check_streamable, merge_records

__all__ = ["Checkpoint", "Sweep", "check_streamable", "merge_records", "offloaded", "release", "skeleton"]
