"""Checking an artifact without reading tensor data: its config and manifest, the weight files' headers and
index, and that the tensors are exactly what the manifest, replayed on the meta model, expects; with
`checksums=True`, also every file's SHA-256 against the digests config.json recorded when it was written. A pipeline
directory written in the pipeline layout is read through its transformer/ (`artifact_root`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
from accelerate import init_empty_weights
from torch import nn

from ..errors import ArtifactError
from .checksums import check_checksums
from .incomplete import CONFIG_KEY, refuse_incomplete, refuse_unfinished_config
from .manifest import FORMAT_VERSION, replay
from .names import CONFIG_NAME, INDEX_NAME, PIPELINE_INDEX, TRANSFORMER_DIR, WEIGHTS_NAME
from .safetensors_file import ST_DTYPES, TensorEntry, read_safetensors_header


def artifact_root(path: str | os.PathLike) -> Path:
    """Where an artifact's config.json and weights are: `path/transformer` for a pipeline directory (the pipeline
    output layout: model_index.json beside transformer/; also a pipeline temp directory not yet holding
    model_index.json), else `path` itself. Every reader (load, verify, inspect, eval) starts here."""
    p = Path(path)
    if (p / TRANSFORMER_DIR).is_dir() and ((p / PIPELINE_INDEX).is_file() or not (p / CONFIG_NAME).is_file()):
        return p / TRANSFORMER_DIR
    return p


def verify_artifact(path: str | os.PathLike, *, checksums: bool = False) -> dict:
    """Check an artifact without reading tensor data (every weight file's header: offsets inside the file, no
    overlap, dtype x shape = bytes; the index; the manifest); returns a summary or raises ArtifactError.

    `checksums=True` also re-hashes every file config.json has a SHA-256 for (about 0.8 s per GiB) and raises
    naming each file that differs; the summary's `checksums` says what was checked, or None for an artifact
    written before dicompress recorded checksums (it is otherwise checked as usual). `path` may be a pipeline
    directory of the pipeline layout: its transformer/ is checked (the summary's `path`); the other components
    are the source pipeline's files, not checked here."""
    root = artifact_root(path)
    config = read_config(root)
    qc = config["quantization_config"]
    headers = _read_weight_headers(root)
    tensors = {k: v for h in headers.values() for k, v in h.items()}
    _check_against_manifest(root, config, tensors)
    summary = {"path": str(root), "class_name": config["_class_name"], "n_tensors": len(tensors),
               "bytes": sum((root / f).stat().st_size for f in headers),
               "manifest_length": len(qc["manifest"]), "format_version": qc["format_version"],
               "dicompress_version": qc.get("dicompress_version"), "weight_files": sorted(headers),
               "has_checksums": "checksums" in qc}
    if checksums:
        recorded = qc.get("checksums")
        summary["checksums"] = None if recorded is None else check_checksums(root, recorded, sorted(headers))
    return summary


def read_config(root: Path, *, require_dicompress: bool = True) -> dict:
    """config.json of a dicompress artifact, with its quantization_config checked (`require_dicompress=False`:
    any readable diffusers config, unchecked)."""
    config = _read_json_config(Path(root))
    if require_dicompress:
        _check_quantization_config(Path(root), config)
    return config


def _read_json_config(root: Path) -> dict:
    if not root.is_dir():
        raise ArtifactError(f"no artifact at {root}: directory missing",
                            hint="check the path; an interrupted write leaves no directory")
    refuse_incomplete(root)
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise ArtifactError(f"{root} has no {CONFIG_NAME}: not a complete artifact",
                            hint="re-run the compression that writes it")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{cfg_path} is not readable JSON: {e}", hint="re-run the compression") from e


def _check_quantization_config(root: Path, config: dict) -> None:
    cfg_path = root / CONFIG_NAME
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "dicompress":
        what = f"quantized with {method!r}" if method else "a plain diffusers model"
        raise ArtifactError(f"{root} is {what}, not a dicompress artifact "
                            f"({CONFIG_NAME} has no quantization_config.quant_method = 'dicompress')",
                            hint="load it with diffusers' from_pretrained directly, or compress it first")
    version = qc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{cfg_path}: quantization_config.format_version is {version!r}, not a positive int",
                            hint=f"{CONFIG_NAME} was edited or damaged; re-run the compression")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{root} was written by a newer dicompress (format {version} > {FORMAT_VERSION}); "
                            f"upgrade dicompress",
                            hint=f"it was written by dicompress {qc.get('dicompress_version') or '(unknown)'}; "
                                 f"`pip install -U dicompress`")
    if CONFIG_KEY in qc:                 # the marker file is gone but the config is a temp directory's
        refuse_unfinished_config(qc[CONFIG_KEY])
    if not isinstance(qc.get("manifest"), list) or not isinstance(config.get("_class_name"), str):
        raise ArtifactError(f"{cfg_path} lacks a manifest list or _class_name", hint="re-run the compression")


def _read_weight_headers(root: Path) -> dict[str, dict[str, TensorEntry]]:
    """file name -> {tensor: header entry}; checks the index (if sharded) against the shards."""
    index_path = root / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{index_path} is unreadable: {e}", hint="re-run the compression") from e
        names = sorted(set(weight_map.values()))
    elif (root / WEIGHTS_NAME).is_file():
        weight_map, names = None, [WEIGHTS_NAME]
    else:
        raise ArtifactError(f"{root} has no weights ({WEIGHTS_NAME} or {INDEX_NAME})",
                            hint="the write did not finish; re-run the compression")
    headers = {}
    for name in names:
        if Path(name).name != name or not (root / name).is_file():
            raise ArtifactError(f"{root}: weight shard {name!r} listed in the index is missing",
                                hint="copy the complete artifact directory")
        headers[name] = read_safetensors_header(root / name)
    if weight_map is not None:
        actual = {k: f for f, h in headers.items() for k in h}
        if actual != weight_map:
            bad = sorted(set(actual.items()) ^ set(weight_map.items()))[:5]
            raise ArtifactError(f"{index_path} does not match the shards' contents, e.g. {bad}",
                                hint="the artifact was edited or partly copied; re-run the compression")
    return headers


def meta_model(config: dict, *, replayed: bool = True) -> nn.Module:
    """The artifact's model on the meta device, built from its config (and rebuilt by its manifest)."""
    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None:
        raise ArtifactError(f"{CONFIG_NAME} names class {config['_class_name']!r}, which diffusers "
                            f"{diffusers.__version__} does not have", hint="upgrade diffusers")
    init = {k: v for k, v in config.items() if k != "quantization_config"}
    with init_empty_weights():  # what diffusers' from_pretrained uses: parameters on meta, buffers real
        model = cls.from_config(init)
    if replayed:
        qc = config["quantization_config"]
        replay(model, qc["manifest"], device="meta", written_by=qc.get("dicompress_version"))
    return model


def _check_against_manifest(root: Path, config: dict, tensors: dict[str, TensorEntry]) -> None:
    """The stored tensors must be exactly what the replayed model expects.

    Tensors of modules the manifest touched must match in shape and dtype, except parameters
    (e.g. a bias), whose dtype follows the model's. Other tensors must match in shape.
    """
    model = meta_model(config)
    params = {n for n, _ in model.named_parameters()}
    touched = tuple(e["module"] + "." for e in config["quantization_config"]["manifest"])
    problems = []
    expected = model.state_dict()
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"missing {name}")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected {name}")
    for name in sorted(set(expected) & set(tensors)):
        want_dtype = ST_DTYPES.get(expected[name].dtype, str(expected[name].dtype))
        want_shape = tuple(expected[name].shape)
        got = tensors[name]
        if got.shape != want_shape:
            problems.append(f"{name} has shape {got.shape}, expected {want_shape}")
        elif name.startswith(touched) and name not in params and got.dtype != want_dtype:
            problems.append(f"{name} has dtype {got.dtype}, expected {want_dtype}")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ArtifactError(f"{root}: the manifest does not match the tensors: " + "; ".join(problems[:8]) + more,
                            hint=f"{CONFIG_NAME}'s manifest and the weights disagree (edited, or written by a "
                                 "buggy pass); re-run the compression")
