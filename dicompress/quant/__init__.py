"""Quantization math as pure functions on tensors (no modules, no model knowledge)."""
