"""File names of a diffusers model directory and of a dicompress artifact, in one place.

An artifact is laid out as diffusers' `save_pretrained` writes a model, plus two things of ours:
    config.json                          the model's diffusers config + `quantization_config` (the manifest)
    diffusion_pytorch_model.safetensors  (or -0000i-of-0000n shards + diffusion_pytorch_model.safetensors.index.json)
    report.json                          what the passes measured
    <extra files>                        samples.png, conditioning.safetensors, ppcl_intervals.safetensors ...
While it is written it is a hidden sibling `.<name>.tmp-incomplete-XXXX/` holding a `.dicompress-incomplete` marker.

In the pipeline layout (the model was a diffusers pipeline directory) the output is a complete pipeline:
    model_index.json                     the source pipeline's, unchanged
    transformer/                         the artifact, laid out as above
    vae/, text_encoder/, tokenizer/ ...  the source's other components, hard-linked file by file (or copied)
"""
from __future__ import annotations

CONFIG_NAME = "config.json"                       # diffusers' config (and, in an artifact, the manifest)
WEIGHTS_PREFIX = "diffusion_pytorch_model"        # every weight file's name starts with it
WEIGHTS_NAME = WEIGHTS_PREFIX + ".safetensors"    # the single-file checkpoint
INDEX_NAME = WEIGHTS_NAME + ".index.json"         # the sharded checkpoint's tensor -> shard map
WEIGHTS_GLOB = WEIGHTS_PREFIX + "*.safetensors"   # the weight files, single or sharded
REPORT_NAME = "report.json"                       # the run report
INTERVALS_NAME = "ppcl_intervals.safetensors"     # ppcl_depth's teacher blocks, for unplugging intervals
FFNS_NAME = "ppcl_width_ffns.safetensors"         # ppcl_width's teacher FFNs, for unplugging projectors
MARKER_NAME = ".dicompress-incomplete"            # in a directory still being written (holds the writer's pid)
PIPELINE_INDEX = "model_index.json"               # a diffusers pipeline directory's list of components
TRANSFORMER_DIR = "transformer"                   # the pipeline's transformer folder: the artifact, in that layout
TEMP_KINDS = ("incomplete", "replaced")           # `.<out>.tmp-incomplete-XXXX`: being written; `-replaced-`: the
                                                  # previous artifact, moved aside for the rename, then deleted


def shard_name(i: int, n: int) -> str:
    """The name of weight shard `i` (1-based) of `n`, as diffusers' `save_pretrained` names it."""
    return f"{WEIGHTS_PREFIX}-{i:05d}-of-{n:05d}.safetensors"


def temp_prefix(out_name: str, kind: str) -> str:
    """The name prefix of the writer's sibling temp directories for output `out_name` (`kind` in TEMP_KINDS)."""
    return f".{out_name}.tmp-{kind}-"
