"""Evaluation: quality metrics, footprint, latency, sample grids and the run summary.

Names are imported from their modules on first use (PEP 562): `digits_eval` imports diffusers' pipelines
(seconds), which recipe checks and `dicompress run --dry-run` never need. `artifact_eval` (an artifact
measured against its source model, and `dicompress inspect`) and `pipeline_eval` (a compressed transformer
inside its real pipeline) load models, so they are imported where used (the CLI, the run), not here."""
from ..lazy import lazy_exports

_EXPORTS = {"evaluate_digits": "digits_eval", "layer_sqnr_table": "digits_eval", "bf16_bytes": "footprint",
            "dir_bytes": "footprint", "quantized_linear_bytes": "footprint", "tensor_bytes": "footprint",
            "save_sample_grid": "grid", "latency_ms_per_step": "latency", "class_accuracy": "metrics",
            "frechet_distance": "metrics", "psnr_db": "metrics", "sqnr_db": "metrics", "format_summary": "summary",
            "ssim": "ssim"}

__all__ = [
    "psnr_db", "sqnr_db", "class_accuracy", "frechet_distance", "ssim",
    "tensor_bytes", "bf16_bytes", "quantized_linear_bytes", "dir_bytes",
    "latency_ms_per_step", "save_sample_grid", "evaluate_digits", "layer_sqnr_table", "format_summary",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
