"""Artifacts: the manifest, the atomic writer, the header-only verifier, and loading through diffusers."""
from .artifact import load, verify_artifact, write_artifact, write_artifact_from_shards
from .diffusers_plugin import register_with_diffusers
from .manifest import FORMAT_VERSION, register_manifest_op, replay

__all__ = ["write_artifact", "write_artifact_from_shards", "verify_artifact", "load", "replay",
           "register_manifest_op", "FORMAT_VERSION", "register_with_diffusers"]
