"""The one safetensors header reader: what it refuses, for artifacts and for the checkpoints streaming reads."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from dicompress.errors import ArtifactError, ModelError
from dicompress.io.names import WEIGHTS_NAME
from dicompress.io.safetensors_file import read_safetensors_header
from dicompress.stream.checkpoint import Checkpoint, read_tensors

TENSORS = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "a.bias": torch.ones(3)}


def _write_header(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture
def ckpt(tmp_path):
    save_file(TENSORS, str(tmp_path / WEIGHTS_NAME))
    return tmp_path


def test_header_entries_locate_each_tensor(ckpt):
    header = read_safetensors_header(ckpt / WEIGHTS_NAME)
    raw = (ckpt / WEIGHTS_NAME).read_bytes()
    for name, t in TENSORS.items():
        e = header[name]
        assert (e.dtype, e.shape) == ("F32", tuple(t.shape))
        assert raw[e.start:e.stop] == t.numpy().tobytes()
    assert read_tensors(ckpt / WEIGHTS_NAME, ["a.weight"])["a.weight"].equal(TENSORS["a.weight"])


def test_truncated_shard_is_refused_by_the_checkpoint_reader(ckpt):
    path = ckpt / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ArtifactError, match="truncated"):
        read_safetensors_header(path)
    with pytest.raises(ModelError, match="truncated") as e:
        Checkpoint(ckpt)
    assert "download or save the model again" in e.value.hint
    with pytest.raises(ModelError, match="truncated"):
        read_tensors(path, ["a.bias"])


def test_offsets_outside_the_file_are_refused(tmp_path):
    path = tmp_path / WEIGHTS_NAME
    _write_header(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, bytes(16))
    with pytest.raises(ModelError, match="truncated"):
        read_tensors(path, ["w"])
    with pytest.raises(ModelError, match="truncated"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("entry, reason", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "data_offsets"),        # end before begin
    ({"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}, "data_offsets"),       # negative
    ({"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}, "spans 16 bytes"),     # shape needs 20 bytes
    ({"dtype": "F32", "shape": [4]}, "data_offsets"),                                # missing key
])
def test_malformed_entries_are_refused(tmp_path, entry, reason):
    path = tmp_path / "x.safetensors"
    _write_header(path, {"w": entry}, bytes(32))
    with pytest.raises(ModelError, match=reason):
        read_tensors(path, ["w"])


def test_header_length_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ArtifactError, match="unreadable safetensors header"):
        read_safetensors_header(path)
