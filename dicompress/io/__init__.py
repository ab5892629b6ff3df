"""Artifacts: the manifest, the atomic writer, the header-only verifier, and loading through diffusers.

    names.py            the file names of a model directory and an artifact
    safetensors_file.py the one safetensors header reader (with its truncation checks) and the aligned writer
    manifest.py         the versioned record of structural changes, replayed on the meta model
    writer.py           write_artifact / write_artifact_from_shards: temp dir, checksums, fsync, verify, the
                        user's-load check, rename
    load_check.py       that check: the temp dir loaded with from_pretrained must reproduce probes of the model
    verify.py           read_config and verify_artifact (headers and manifest; checksums on request)
    checksums.py        the SHA-256 of an artifact's files, recorded in config.json and checked
    incomplete.py       the marker of a directory being written; refused by readers, removed when its writer died
    loader.py           load: verify, then diffusers' from_pretrained through the plug-in
    diffusers_plugin.py the "dicompress" quantizer registered with diffusers
    storage.py          the dtype kept parameters are stored in;  pluggable.py  PPCL's intervals at load time
"""
from ..lazy import lazy_exports

# name -> the module defining it, imported on first use (PEP 562): `from dicompress.io.names import ...` (a
# pass reading a file name, a recipe check) then does not import diffusers' quantizers, seconds here, through
# the plug-in
_EXPORTS = {"register_with_diffusers": "diffusers_plugin", "load": "loader", "FORMAT_VERSION": "manifest",
            "register_manifest_op": "manifest", "replay": "manifest", "verify_artifact": "verify",
            "write_artifact": "writer", "write_artifact_from_shards": "writer"}

__all__ = ["write_artifact", "write_artifact_from_shards", "verify_artifact", "load", "replay",
           "register_manifest_op", "FORMAT_VERSION", "register_with_diffusers"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
