"""Make `<DiffusersModel>.from_pretrained(artifact_dir)` load dicompress artifacts.

diffusers has no public registry for third-party quantizers, so `register_with_diffusers` adds
"dicompress" to the two dicts `diffusers.quantizers.auto` looks methods up in. What this relies on
(tests/test_artifact.py passes on diffusers 0.35.0 and 0.42.1; hence the pinned range):
  - `AUTO_QUANTIZER_MAPPING` / `AUTO_QUANTIZATION_CONFIG_MAPPING` (module-level dicts, mutated in place);
  - `QuantizationConfigMixin.from_dict` calling `cls(**config_dict)`, and `quant_method.value`;
  - `DiffusersQuantizer.preprocess_model` running on the meta model before weights are read;
  - `load_model_dict_into_meta` casting every floating tensor to `torch_dtype` unless
    `check_if_quantized_param` claims it, then calling `create_quantized_param(model, param, name,
    device, state_dict, ...)` with the *uncast* tensor still in `state_dict`. That is how the codec
    tensors (fp16 scales ...) keep their stored dtype whatever `torch_dtype` the user asks for.
"""
from __future__ import annotations

from enum import Enum

import torch
from packaging.specifiers import SpecifierSet
from torch import nn

from ..errors import ArtifactError, ModelError
from ..nn.act import TransformedLinear
from ..nn.qlinear import QuantLinear
from ..nn.surgery import set_module
from .incomplete import refuse_unfinished_config
from .manifest import FORMAT_VERSION, ORIGINAL_MODEL_OPS, dicompress_version, replay
from .on_load import OnLoadQuantizer, check_on_load_passes

DIFFUSERS_RANGE = ">=0.35,<0.43"

try:
    import diffusers
    from diffusers.quantizers import auto as _auto
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin
except ImportError as e:  # the internals moved: a diffusers far outside the tested range
    raise ModelError(f"this diffusers has no quantizer plug-in API that dicompress knows ({e})",
                     hint=f"pip install 'diffusers{DIFFUSERS_RANGE}'") from e


class DicompressMethod(str, Enum):
    # diffusers reads `quant_method.value` and compares with its own str Enum members.
    DICOMPRESS = "dicompress"


def check_diffusers_version() -> None:
    if diffusers.__version__ not in SpecifierSet(DIFFUSERS_RANGE, prereleases=True):
        raise ModelError(
            f"dicompress loads artifacts through diffusers internals tested for diffusers{DIFFUSERS_RANGE}; "
            f"found diffusers {diffusers.__version__}",
            hint=f"pip install 'diffusers{DIFFUSERS_RANGE}'")


class DicompressConfig(QuantizationConfigMixin):
    """`config.json`'s `quantization_config` for a dicompress artifact (the manifest lives here)."""

    def __init__(self, manifest: list[dict] | None = None, format_version: int = FORMAT_VERSION,
                 dicompress_version: str | None = None, source: dict | None = None,
                 quant_method: str = DicompressMethod.DICOMPRESS.value, incomplete: dict | None = None,
                 passes: list[dict] | None = None, **extra):
        """An artifact's config (`manifest` ...), or a quantize-on-load request: `passes=[{"tlq": {"bits": 4}}]`
        (one weight-only tlq / rtn pass with gptq off; checked here, before any weight is read)."""
        if incomplete is not None:        # a temp directory's config.json, read before the write finished
            refuse_unfinished_config(incomplete)
        if not isinstance(format_version, int) or format_version < 1:
            raise ArtifactError(f"quantization_config.format_version is {format_version!r}, not a positive int",
                                hint="config.json was edited or damaged; re-run the compression")
        if format_version > FORMAT_VERSION:
            raise ArtifactError(
                f"artifact written by a newer dicompress (format {format_version} > {FORMAT_VERSION}); "
                f"upgrade dicompress",
                hint=f"it was written by dicompress {dicompress_version or '(unknown)'}; `pip install -U dicompress`")
        self.quant_method = DicompressMethod.DICOMPRESS
        self.format_version = format_version
        self.dicompress_version = dicompress_version
        self.manifest = list(manifest or [])
        self.source = dict(source or {})
        self.extra = extra  # keys from a newer writer of the same format: kept, round-tripped
        if passes is not None:
            if self.manifest:
                raise ArtifactError("a DicompressConfig holds either an artifact's manifest or on-load passes",
                                    hint="pass only `passes` to quantize an original model on load")
            check_on_load_passes(passes)
        self.passes = None if passes is None else [dict(p) if isinstance(p, dict) else p for p in passes]

    @property
    def on_load(self) -> bool:
        """A request to quantize while loading (not yet an artifact's config)."""
        return self.passes is not None

    def to_dict(self) -> dict:
        d = {"quant_method": self.quant_method.value, "format_version": self.format_version,
             "dicompress_version": self.dicompress_version, "manifest": self.manifest,
             "source": self.source, **self.extra}
        return {**d, "passes": self.passes} if self.on_load else d

    def to_diff_dict(self) -> dict:
        # The mixin's to_json_string/__repr__ call this but only bitsandbytes' config defines it.
        return self.to_dict()

    def __repr__(self) -> str:
        # Short: diffusers formats the config into debug-log f-strings on every load.
        if self.on_load:
            return f"DicompressConfig(quantize on load: {self.passes})"
        return (f"DicompressConfig(format {self.format_version}, {len(self.manifest)} manifest entries, "
                f"written by dicompress {self.dicompress_version})")


class DicompressQuantizer(DiffusersQuantizer):
    """Rebuilds the compressed module tree on the meta model; keeps codec tensors in stored dtypes."""

    requires_calibration = True      # only pre-quantized artifacts can be loaded
    use_keep_in_fp32_modules = True  # the model's fp32-kept modules stay fp32, as in a plain load

    def __init__(self, quantization_config, **kwargs):
        # an on-load request quantizes an original checkpoint (diffusers' pre_quantized=False path)
        self.requires_calibration = not quantization_config.on_load
        super().__init__(quantization_config, **kwargs)
        self._stored_dtype: dict[str, torch.dtype] = {}
        self._on_load: OnLoadQuantizer | None = None
        self._dtype: torch.dtype | None = None

    def validate_environment(self, *args, **kwargs):
        check_diffusers_version()
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ModelError("dicompress artifacts cannot be offloaded to disk (device_map has 'disk')",
                             hint="give the model a cpu or cuda device_map; it is already compressed")

    def update_torch_dtype(self, torch_dtype):
        self._dtype = torch_dtype          # what the unquantized parameters (and biases) become
        return torch_dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if cfg.on_load:
            if self.pre_quantized:
                raise ArtifactError("this checkpoint is already a dicompress artifact; it loads without passes",
                                    hint="call from_pretrained without quantization_config")
            self._on_load = OnLoadQuantizer(model, cfg.passes)
            return model
        replay(model, cfg.manifest, device="meta", written_by=cfg.dicompress_version)
        # Buffers of rebuilt modules are format tensors (codes, scales ...): their dtype is part of
        # the format, unlike parameters, which follow the user's torch_dtype.
        touched = {e["module"] for e in cfg.manifest if e["op"] not in ORIGINAL_MODEL_OPS}
        self._stored_dtype = {f"{m}.{b}": t.dtype for m in touched
                              for b, t in model.get_submodule(m).named_buffers(recurse=True)}
        return model

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        if self._on_load is not None:
            return self._on_load.claims(param_name)
        return param_name in self._stored_dtype

    def check_quantized_param_shape(self, param_name, current_param, loaded_param):
        if current_param.shape != loaded_param.shape:
            raise ArtifactError(f"{param_name}: the manifest implies shape {tuple(current_param.shape)}, "
                                f"the weights hold {tuple(loaded_param.shape)}",
                                hint="run dicompress.io.verify_artifact on the directory for the full report")
        return True

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict,
                               unexpected_keys=None, **kwargs):
        value = state_dict[param_name]  # the tensor as stored, before diffusers cast it to torch_dtype
        if self._on_load is not None:
            self._on_load.quantize_weight(model, param_name, value, target_device, self._dtype)
            return
        want = self._stored_dtype[param_name]
        if value.dtype != want:
            raise ArtifactError(f"{param_name} is stored as {value.dtype}, the format says {want}",
                                hint="the artifact was edited or written by a buggy pass; re-run the compression")
        module_name, _, buf = param_name.rpartition(".")
        model.get_submodule(module_name)._buffers[buf] = value.to(target_device)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # diffusers only warns about missing weights and leaves them on meta; a half-loaded
        # compressed model must not pass silently.
        missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if missing:
            raise ArtifactError(f"{len(missing)} tensors were not in the artifact's weights, e.g. {missing[:5]}",
                                hint="the artifact is incomplete; run dicompress.io.verify_artifact on it")
        _realign_cpu_tensors(model)
        if self._on_load is not None:      # from now on an ordinary artifact's config: save_pretrained writes it
            cfg = self.quantization_config
            cfg.manifest = self._on_load.manifest()
            cfg.dicompress_version = dicompress_version()
            cfg.source = {"on_load": cfg.passes, "name": str(getattr(model.config, "_name_or_path", "") or "")}
            cfg.passes, self._on_load = None, None
            self.pre_quantized = True
        return model

    def _dequantize(self, model):
        for name, mod in list(model.named_modules()):
            if isinstance(mod, QuantLinear):
                w = mod.dequantize()
                act = getattr(mod, "act", None)   # a smoothed / rotated input stays transformed
                if act is not None:
                    lin = TransformedLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, act=act,
                                            device=w.device, dtype=w.dtype)
                else:
                    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    device=w.device, dtype=w.dtype)
                lin.weight.data.copy_(w)
                if mod.bias is not None:
                    lin.bias.data.copy_(mod.bias)
                set_module(model, name, lin)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _realign_cpu_tensors(model: nn.Module, align: int = 64) -> None:
    """Copy CPU tensors that sit at unaligned addresses into fresh (aligned) memory.

    diffusers hands out zero-copy views into the mmapped safetensors file, at whatever offset the
    tensor has there; CPU GEMM takes a different path on unaligned data and rounds differently
    (1 ulp), so without this a loaded model would not reproduce the in-memory one bit for bit.
    """
    with torch.no_grad():
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None and t.device.type == "cpu" and t.data_ptr() % align:
                        if isinstance(t, nn.Parameter):
                            t.data = t.data.clone()
                        else:
                            store[name] = t.clone()


def register_with_diffusers() -> None:
    """Add the "dicompress" quant method to diffusers (idempotent). Raises ModelError outside the tested range."""
    check_diffusers_version()
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[DicompressMethod.DICOMPRESS.value] = DicompressConfig
    _auto.AUTO_QUANTIZER_MAPPING[DicompressMethod.DICOMPRESS.value] = DicompressQuantizer
    from ..lora import install_if_available   # LoRA on compressed layers through diffusers' own API
    install_if_available()
