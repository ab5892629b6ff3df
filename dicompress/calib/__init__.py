"""Calibration: capture over a real sampling loop, and the on-disk store."""
from .capture import Capture, LinearStats
from .sources import capture
from .store import CalibrationStore, StoreWriter

__all__ = ["Capture", "LinearStats", "capture", "CalibrationStore", "StoreWriter"]
