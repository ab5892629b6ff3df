"""dicompress: post-training compression for Diffusion Transformers.

    import dicompress
    state = dicompress.compress(model, [dicompress.TLQ(bits=4)])
    dicompress.save(state, "out/my_model")                 # loads back with diffusers' from_pretrained
    report = dicompress.run("recipes/tiny_flux_w4.yaml")   # a whole recipe, end to end
"""
from .arch import register_arch
from .errors import ArtifactError, CalibrationError, DicompressError, DistillError, ModelError, RecipeError
from .io import load, register_manifest_op, register_with_diffusers, verify_artifact, write_artifact
from .io.load_check import LoadCheck
from .io.storage import round_parameters
from .passes import ARS, RTN, TLQ, ActQuant, Pass, PassConfig, Smooth, register_pass
from .pipeline import compress, run
from .probes import model_probes
from .recipe import Recipe, load_recipe
from .version import __version__

register_with_diffusers()


def save(state, out_dir, report: dict | None = None, overwrite: bool = False, files: dict | None = None,
         save_dtype=None):
    """Write a compressed model (a CompressionState from `compress`) as a dicompress artifact. `save_dtype`
    (e.g. torch.bfloat16): store the kept parameters in it; the model's parameters are rounded through it in
    place, so the model in memory is the one that loads back."""
    if save_dtype is not None:
        round_parameters(state.model, save_dtype)
    rep = dict(report or state.report)
    p = next(state.model.parameters())
    check = LoadCheck(model_probes(state.model, state.adapter), dtype=p.dtype, device=p.device)
    return write_artifact(state.model, out_dir, manifest=state.manifest, report=rep,
                          source={"model": getattr(getattr(state.model, "config", None), "_name_or_path", None)},
                          files={**state.files, **(files or {})}, overwrite=overwrite, save_dtype=save_dtype,
                          check=check)


__all__ = ["__version__", "compress", "run", "load", "save", "verify_artifact", "Recipe", "load_recipe", "Pass",
           "PassConfig", "TLQ", "RTN", "Smooth", "ARS", "ActQuant", "register_pass", "register_arch",
           "register_manifest_op", "DicompressError", "RecipeError", "ModelError", "ArtifactError", "CalibrationError",
           "DistillError"]
