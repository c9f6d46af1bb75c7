"""Text-to-video through a real ComfyUI server: the pack loads, every node is there, the bundled
workflows run on smoke weights and write mp4s with the asked frame count, size and fps."""
import pytest

from conftest import run_workflow
from media import probe

PACK_NODES = ["WanLeanModelLoader", "WanLeanVAELoader", "WanLeanTextEncoderLoader", "WanLeanTextEncode",
              "WanLeanSampler", "WanLeanVAEDecode", "WanLeanSaveVideo"]


def test_pack_loads_without_errors(server):
    info = server.object_info()
    missing = [n for n in PACK_NODES if n not in info]
    assert not missing, f"pack nodes missing: {missing}\n{server.log_tail()}"
    assert not server.import_errors(), server.import_errors()
    assert not server.tracebacks(), server.tracebacks()


# the 14B run reads the official layouts: sharded bf16 DiT + index json, Wan2.1_VAE.pth, the umT5 .pth
# with its google/umt5-xxl/ tokenizer folder beside it
OFFICIAL_FILES = {
    "WanLeanModelLoader.model_name": "Wan2.1-T2V-14B/diffusion_pytorch_model-00001-of-00002.safetensors",
    "WanLeanVAELoader.vae_name": "Wan2.1_VAE.pth",
    "WanLeanTextEncoderLoader.text_encoder_name": "models_t5_umt5-xxl-enc-bf16.pth",
}


@pytest.mark.parametrize("workflow,size,length,sampler,files", [
    ("wan21_t2v_1.3B.json", (160, 96), 9, "unipc", {}),
    ("wan21_t2v_14B.json", (128, 64), 5, "dpm++", OFFICIAL_FILES),
])
def test_t2v_workflow_writes_mp4(server, workflow, size, length, sampler, files):
    width, height = size
    files = run_workflow(server, workflow, {
        "WanLeanSampler.width": width, "WanLeanSampler.height": height, "WanLeanSampler.length": length,
        "WanLeanSampler.steps": 3, "WanLeanSampler.sampler": sampler, **files})
    videos = [f for f in files if f.endswith(".mp4")]
    assert len(videos) == 1, files
    info = probe(videos[0])
    assert (info["frames"], info["width"], info["height"]) == (length, width, height)
    assert info["fps"] == 16
