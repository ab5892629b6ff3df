"""Evaluation: quality metrics, footprint, latency, sample grids and the run summary.

`artifact_eval` (an artifact measured against its source model, and `dicompress inspect`) loads models and
artifacts, so it is imported where used (the CLI), not here."""
from .digits_eval import evaluate_digits, layer_sqnr_table
from .footprint import bf16_bytes, dir_bytes, quantized_linear_bytes, tensor_bytes
from .grid import save_sample_grid
from .latency import latency_ms_per_step
from .metrics import class_accuracy, frechet_distance, psnr_db, sqnr_db
from .summary import format_summary

__all__ = [
    "psnr_db", "sqnr_db", "class_accuracy", "frechet_distance",
    "tensor_bytes", "bf16_bytes", "quantized_linear_bytes", "dir_bytes",
    "latency_ms_per_step", "save_sample_grid", "evaluate_digits", "layer_sqnr_table", "format_summary",
]
