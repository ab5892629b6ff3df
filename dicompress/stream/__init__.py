"""Streaming compression: models larger than memory, one block's weights at a time."""
from .checkpoint import Checkpoint, offloaded, release, skeleton
from .sweep import Sweep, block_records, check_streamable, streaming_section

__all__ = ["Checkpoint", "Sweep", "block_records", "check_streamable", "streaming_section", "offloaded", "release", "skeleton"]
