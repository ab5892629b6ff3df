"""Quantization math as pure functions on tensors (no modules, no model knowledge)."""
# the built-in codecs register themselves on import, so get_codec knows them whichever quant module is
# imported first (codecs.py cannot import them: they import it)
from . import tlq, uniform  # noqa: F401
