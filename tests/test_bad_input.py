"""Every mistake a user can make with the pack's nodes ends in a clear error (naming the input and the fix) in the
server's execution-error message; the server stays up after each, and a good workflow then still runs."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from comfy_host import ExecutionError
from conftest import ROOT, run_workflow
from media import probe
from run_workflow import shrink
from workflow_api import set_inputs, ui_to_api

SMALL = {"width": 64, "height": 64, "length": 5, "steps": 1}
T2V, I2V, FLF, A14B_T, A14B_I, TI2V_T, TI2V_I = (
    "wan21_t2v_1.3B.json", "wan21_i2v_480p.json", "wan21_flf2v_720p.json", "wan22_t2v_a14b.json",
    "wan22_i2v_a14b.json", "wan22_ti2v_5b_t2v.json", "wan22_ti2v_5b_i2v.json")
M, V, TE, CV = ("WanLeanModelLoader.model_name", "WanLeanVAELoader.vae_name",
                "WanLeanTextEncoderLoader.text_encoder_name", "WanLeanCLIPVisionLoader.clip_name")
S, I2VN = "WanLeanSampler", "WanLeanImageToVideo"
LONG_T, LONG_I, L = "wan22_t2v_a14b_long.json", "wan22_i2v_a14b_long.json", "WanLeanLongVideo"


def node_id(api, class_type, title=None):
    return next(k for k, v in api.items() if v["class_type"] == class_type
                and (title is None or v.get("_meta", {}).get("title") == title))


def link_end_image(api):
    api[node_id(api, I2VN)]["inputs"]["end_image"] = [node_id(api, "LoadImage"), 0]


def batch_of_two(api):
    api["900"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [node_id(api, "LoadImage"), 0], "amount": 2}}
    api[node_id(api, I2VN)]["inputs"]["start_image"] = ["900", 0]


def unlink_start(api):
    del api[node_id(api, L)]["inputs"]["start_image"]


def odd_frames(api):
    save = node_id(api, "WanLeanSaveVideo")
    api["901"] = {"class_type": "ImageScale", "inputs": {"image": api[save]["inputs"]["frames"], "upscale_method": "nearest-exact",
                                                         "width": 33, "height": 33, "crop": "disabled"}}
    api[save]["inputs"]["frames"] = ["901", 0]


# (id, workflow, overrides, graph edit or None, words the error must contain)
CASES = [
    ("length-not-1+4k", T2V, {f"{S}.length": 8}, None, "length 8 is not 1+4k frames; use 5 or 9"),
    ("width-not-16", T2V, {f"{S}.width": 72}, None, "width 72 is not a multiple of 16; use 64 or 80"),
    ("height-not-16", T2V, {f"{S}.height": 40}, None, "height 40 is not a multiple of 16; use 32 or 48"),
    ("ti2v-width-not-32", TI2V_T, {f"{S}.width": 80}, None, "width 80 is not a multiple of 32; use 64 or 96"),
    ("i2v-length-not-1+4k", I2V, {f"{I2VN}.length": 6, f"{S}.length": 6}, None, "length 6 is not 1+4k"),
    ("absurd-size", T2V, {f"{S}.width": 4096, f"{S}.height": 4096, f"{S}.length": 1021}, None,
     "GiB for the sampler's activations"),
    ("official-t5-as-model", T2V, {M: "bad/models_t5_no_tokenizer.pth"}, None, "it looks like a umT5 text encoder (official"),
    ("vae-as-model", T2V, {M: "bad/vae_copy.safetensors"}, None, "is not a Wan diffusion model: it looks like a video VAE"),
    ("t5-as-model", T2V, {M: "bad/umt5_copy.safetensors"}, None, "is not a Wan diffusion model: it looks like a umT5"),
    ("clip-as-model", T2V, {M: "bad/clip_copy.safetensors"}, None, "is not a Wan diffusion model: it looks like a CLIP"),
    ("sd-checkpoint-as-model", T2V, {M: "bad/sd15_fake.safetensors"}, None, "looks like a Stable Diffusion checkpoint"),
    ("unknown-file-as-model", T2V, {M: "bad/random_tensors.safetensors"}, None, "looks like no known model"),
    ("truncated-model", T2V, {M: "bad/truncated.safetensors"}, None, "truncated or corrupt"),
    ("model-as-vae", T2V, {V: "bad/dit_copy.safetensors"}, None, "is not a video VAE"),
    ("model-as-text-encoder", T2V, {TE: "bad/dit_copy.safetensors"}, None, "not a umT5 encoder"),
    ("missing-tokenizer", T2V, {TE: "bad/models_t5_no_tokenizer.pth"}, None, "tokenizer"),
    ("model-as-clip", I2V, {CV: "bad/dit_copy.safetensors"}, None, "CLIP"),
    ("vae22-for-t2v-latent", T2V, {V: "wan2.2_vae.safetensors"}, None, "does not fit this VAE"),
    ("vae21-for-ti2v-latent", TI2V_T, {V: "wan_2.1_vae.safetensors"}, None, "does not fit this VAE"),
    ("vae22-for-i2v", I2V, {V: "wan2.2_vae.safetensors"}, None, "needs the Wan 2.1 VAE"),
    ("i2v-model-without-image", T2V, {M: "wan2.1_i2v_480p_14B_fp16.safetensors"}, None, "connect Wan Image To Video"),
    ("t2v-model-with-image", I2V, {M: "wan2.1_t2v_1.3B_fp16.safetensors"}, None, "the image conditioning has 20 channels"),
    ("i2v-without-clip", A14B_I, {"High-noise expert.model_name": "wan2.1_i2v_480p_14B_fp16.safetensors",
                                  "Low-noise expert.model_name": "wan2.1_i2v_720p_14B_fp16.safetensors"}, None,
     "needs CLIP vision tokens"),
    ("experts-of-two-variants", A14B_T, {"Low-noise expert.model_name": "wan2.2_i2v_low_noise_14B_fp16.safetensors"}, None,
     "low_noise_model is Wan 2.2 I2V-A14B"),
    ("image-size-mismatch", I2V, {f"{I2VN}.width": 128}, None, "made for another size or length"),
    ("ti2v-with-end-image", TI2V_I, {}, link_end_image, "TI2V-5B takes a start image only"),
    ("two-start-images", I2V, {}, batch_of_two, "start_image holds 2 images"),
    ("odd-frame-size", T2V, {}, odd_frames, "H.264 needs even frame sizes"),
    ("long-length-not-whole-clips", LONG_T, {f"{L}.length": 40, f"{L}.clip_length": 13}, None,
     "Wan Long Video: length 40 is not a whole number of clips: n clips make clip_length + (n - 1) x (clip_length - "
     "overlap) = 13 + (n - 1) x 8 frames; use 37 (4 clips) or 45 (5 clips)"),
    ("long-more-prompts-than-clips", LONG_T, {f"{L}.length": 21, f"{L}.clip_length": 13}, None,
     "Wan Long Video: prompts has 3 lines but the length makes 2 clips: remove 1 line or raise length"),
    ("long-overlap-too-large", LONG_T, {f"{L}.length": 13, f"{L}.clip_length": 13, f"{L}.overlap": 9}, None,
     "overlap 9 must be 1+4j frames and less than half of clip_length 13"),
    ("long-i2v-without-start-image", LONG_I, {f"{L}.length": 13, f"{L}.clip_length": 13}, unlink_start,
     "needs a start image: connect start_image"),
]


@pytest.fixture(scope="module")
def bad_files(smoke_models):
    """Wrong, fake and broken files next to the good smoke models (folder `bad/` in each model folder)."""
    from wan_core.checkpoint import read_file
    for folder in ("diffusion_models", "vae", "text_encoders", "clip_vision"):
        os.makedirs(os.path.join(smoke_models, folder, "bad"), exist_ok=True)
    copies = {"vae_copy": "vae/wan_2.1_vae.safetensors", "umt5_copy": "text_encoders/umt5_xxl_fp16.safetensors",
              "clip_copy": "clip_vision/clip_vision_h.safetensors", "dit_copy": "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"}
    for name, src in copies.items():
        sd = read_file(os.path.join(smoke_models, src))
        for folder in ("diffusion_models", "vae", "text_encoders", "clip_vision"):
            save_file(sd, os.path.join(smoke_models, folder, "bad", name + ".safetensors"))
    dm = os.path.join(smoke_models, "diffusion_models", "bad")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, os.path.join(dm, "sd15_fake.safetensors"))
    save_file({"foo.weight": torch.zeros(3), "bar.bias": torch.zeros(2)}, os.path.join(dm, "random_tensors.safetensors"))
    data = open(os.path.join(smoke_models, copies["dit_copy"]), "rb").read()
    open(os.path.join(dm, "truncated.safetensors"), "wb").write(data[: len(data) // 3])
    t5 = torch.load(os.path.join(smoke_models, "text_encoders", "models_t5_umt5-xxl-enc-bf16.pth"), weights_only=True)
    for folder in ("text_encoders", "diffusion_models"):
        torch.save(t5, os.path.join(smoke_models, folder, "bad", "models_t5_no_tokenizer.pth"))
    return smoke_models


def prompt(server, workflow, overrides, edit):
    with open(os.path.join(ROOT, "workflows", workflow), encoding="utf-8") as f:
        api = shrink(ui_to_api(json.load(f), server.object_info()), SMALL)
    api = set_inputs(api, overrides)
    if edit:
        edit(api)
    return api


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(server, bad_files, case):
    name, workflow, overrides, edit, words = case
    with pytest.raises(ExecutionError) as err:
        server.run(prompt(server, workflow, overrides, edit), timeout=300)
    message = str(err.value)
    assert words in message, message
    assert "WanLeanSampler" in server.object_info()  # the server is still up


def test_good_workflow_runs_after_the_errors(server, bad_files):
    files = run_workflow(server, T2V, {}, sizes=SMALL)
    info = probe(next(f for f in files if f.endswith(".mp4")))
    assert (info["frames"], info["width"], info["height"]) == (5, 64, 64)
