"""Every bundled workflow through a real ComfyUI server on smoke weights: the pack loads, every node is
there, and each workflow writes an mp4 with the asked frame count, size and fps."""
import os

import pytest

from conftest import ROOT, run_workflow
from media import probe

WORKFLOWS = sorted(f for f in os.listdir(os.path.join(ROOT, "workflows")) if f.endswith(".json"))
# the 14B T2V run reads the official layouts instead: sharded bf16 DiT + index json, Wan2.1_VAE.pth, the umT5
# .pth with its google/umt5-xxl/ tokenizer folder beside it
OFFICIAL_FILES = {
    "WanLeanModelLoader.model_name": "Wan2.1-T2V-14B/diffusion_pytorch_model-00001-of-00002.safetensors",
    "WanLeanVAELoader.vae_name": "Wan2.1_VAE.pth",
    "WanLeanTextEncoderLoader.text_encoder_name": "models_t5_umt5-xxl-enc-bf16.pth",
}


PACK_NODES = {"WanLeanModelLoader", "WanLeanVAELoader", "WanLeanTextEncoderLoader", "WanLeanCLIPVisionLoader",
              "WanLeanTextEncode", "WanLeanCLIPVisionEncode", "WanLeanImageToVideo", "WanLeanSampler",
              "WanLeanSamplerA14B", "WanLeanVAEDecode", "WanLeanSaveVideo"}


def test_pack_loads_without_errors(server):
    pack = {n for n in server.object_info() if n.startswith("WanLean")}
    assert pack == PACK_NODES
    assert not server.import_errors(), server.import_errors()
    assert not server.tracebacks(), server.tracebacks()


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_workflow_writes_mp4(server, workflow):
    width, height, length = 128, 64, 5  # multiples of 32 for TI2V-5B
    overrides = OFFICIAL_FILES if workflow == "wan21_t2v_14B.json" else {}
    sampler = {"WanLeanSampler.sampler": "dpm++"} if workflow == "wan21_t2v_1.3B.json" else {}
    files = run_workflow(server, workflow, {**overrides, **sampler},
                         sizes={"width": width, "height": height, "length": length, "steps": 3})
    videos = [f for f in files if f.endswith(".mp4")]
    assert len(videos) == 1, files
    info = probe(videos[0])
    assert (info["frames"], info["width"], info["height"]) == (length, width, height)
    assert info["fps"] == (24 if "ti2v" in workflow else 16)
