"""Checkpoint reading: official keys, ComfyUI's prefix, official shards + index json, .pth; clear errors."""
import os

import pytest
import torch
from safetensors.torch import save_file

from wan_core.checkpoint import CheckpointError, load_dit, read_file
from wan_core.dit import WanDiT
from fixtures.smoke import randomize_, write_sharded



@pytest.fixture(scope="module")
def dit_sd():
    return {k: v.contiguous() for k, v in randomize_(WanDiT(dim=128, ffn_dim=64, num_layers=1, text_dim=8)).state_dict().items()}


def same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prefix_and_pth(tmp_path, dit_sd):
    save_file({"model.diffusion_model." + k: v for k, v in dit_sd.items()} | {"first_stage_model.x": torch.ones(1)},
              tmp_path / "comfy.safetensors")
    torch.save(dit_sd, tmp_path / "official.pth")
    same(load_dit(str(tmp_path / "comfy.safetensors")).sd, dit_sd)
    same(load_dit(str(tmp_path / "official.pth")).sd, dit_sd)


def test_sharded_by_shard_index_or_folder(tmp_path, dit_sd):
    write_sharded(dit_sd, str(tmp_path / "wan"), shards=3)
    for path in ("wan/diffusion_pytorch_model-00002-of-00003.safetensors",
                 "wan/diffusion_pytorch_model.safetensors.index.json", "wan"):
        same(read_file(str(tmp_path / path)), dit_sd)
    os.remove(tmp_path / "wan" / "diffusion_pytorch_model-00003-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="00003-of-00003.safetensors' listed in .* is missing"):
        read_file(str(tmp_path / "wan"))


def test_wrong_kind_and_corrupt_files(tmp_path):
    save_file({"decoder.conv1.weight": torch.zeros(1), "encoder.conv1.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="'vae.safetensors' is not a Wan diffusion model: it looks like a video VAE"):
        load_dit(str(tmp_path / "vae.safetensors"))
    data = (tmp_path / "vae.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_file(str(tmp_path / "cut.safetensors"))
    (tmp_path / "model.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unsupported file type"):
        read_file(str(tmp_path / "model.onnx"))
