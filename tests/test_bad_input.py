"""Every mistake a user can make with the pack's nodes ends in a clear error (naming the input and the fix) in the
server's execution-error message; the server stays up after each, and a good workflow then still runs."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from comfy_host import ExecutionError
from conftest import ROOT, SMOKE_INPUT, run_workflow
from media import assert_real_video, probe
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


def long_end_image(api):
    api[node_id(api, L)]["inputs"]["end_image"] = [node_id(api, "LoadImage"), 0]


def long_clip_end_only(api):
    api["905"] = {"class_type": "WanLeanCLIPVisionLoader", "inputs": {"clip_name": "clip_vision_h.safetensors"}}
    api["906"] = {"class_type": "WanLeanCLIPVisionEncode",
                  "inputs": {"clip_vision": ["905", 0], "image": [node_id(api, "LoadImage"), 0]}}
    api[node_id(api, L)]["inputs"]["clip_vision_end"] = ["906", 0]


def odd_frames(api):
    save = node_id(api, "WanLeanSaveVideo")
    api["901"] = {"class_type": "ImageScale", "inputs": {"image": api[save]["inputs"]["frames"], "upscale_method": "nearest-exact",
                                                         "width": 33, "height": 33, "crop": "disabled"}}
    api[save]["inputs"]["frames"] = ["901", 0]


def with_lora(name):
    """A graph edit: Wan Load LoRA `name` between the model loader and the sampler."""
    def edit(api):
        sampler = api[node_id(api, S)]["inputs"]
        api["902"] = {"class_type": "WanLeanLoraLoader", "inputs": {"model": sampler["model"], "lora_name": name,
                                                                    "strength": 1.0}}
        sampler["model"] = ["902", 0]
    return edit


def combined_positive(api):
    sampler = api[node_id(api, S)]["inputs"]
    api["903"] = {"class_type": "ConditioningCombine",
                  "inputs": {"conditioning_1": sampler["positive"], "conditioning_2": sampler["positive"]}}
    sampler["positive"] = ["903", 0]


def clip_end_without_start(api):
    del api[node_id(api, I2VN)]["inputs"]["clip_vision_start"]


def save_with_audio(name):
    """A graph edit: Wan Load Audio `name` into Wan Save Video's audio input."""
    def edit(api):
        api["904"] = {"class_type": "WanLeanLoadAudio", "inputs": {"audio_file": name}}
        api[node_id(api, "WanLeanSaveVideo")]["inputs"]["audio"] = ["904", 0]
    return edit


DAMAGED = "probably damaged"
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
    ("s2v-in-wan-sampler", T2V, {M: "wan2.2_s2v_14B_bf16.safetensors"}, None, "S2V-14B model, which samples only"),
    ("s2v-in-a14b-sampler", A14B_T, {"High-noise expert.model_name": "wan2.2_s2v_14B_bf16.safetensors"}, None,
     "use Wan Speech To Video"),
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
    ("long-end-image-on-i2v", LONG_I, {f"{L}.length": 13, f"{L}.clip_length": 13}, long_end_image,
     "Wan Long Video: end_image is for Wan 2.1 FLF2V-14B only, and the model is Wan 2.2 I2V-A14B"),
    ("long-clip-end-without-start", LONG_I, {f"{L}.length": 13, f"{L}.clip_length": 13}, long_clip_end_only,
     "clip_vision_end is connected without clip_vision_start and end_image"),
    ("long-text-of-another-width", LONG_T, {f"{L}.length": 13, f"{L}.clip_length": 13, TE: "bad/umt5_narrow.safetensors"},
     None, "Wan Long Video: positive conditioning has features 32 wide but this Wan model takes umT5-XXL"),
    # NaN/inf where it appears, not a black video (issue 13)
    ("nan-in-model", T2V, {M: "bad/dit_nan.safetensors"}, None, "prediction at step 1 of 1 holds"),
    ("nan-in-model-names-cause", T2V, {M: "bad/dit_nan.safetensors"}, None, "model file is " + DAMAGED),
    ("nan-in-a14b-expert", A14B_T, {"Low-noise expert.model_name": "bad/dit_nan.safetensors",
                                    "High-noise expert.model_name": "bad/dit_nan.safetensors"}, None, "step 1 of 1"),
    ("inf-in-clip", I2V, {CV: "bad/clip_inf.safetensors"}, None, "the CLIP vision tokens holds"),
    ("nan-in-vae-decoder", T2V, {V: "bad/vae_nan_decoder.safetensors"}, None, "the decoded video holds"),
    ("nan-in-vae-names-cause", T2V, {V: "bad/vae_nan_decoder.safetensors"}, None, "the VAE file is " + DAMAGED),
    ("nan-in-vae-encoder", I2V, {V: "bad/vae_nan_encoder.safetensors"}, None, "the start image's VAE latent holds"),
    # weight files of the wrong kind
    ("int8-model", T2V, {M: "bad/dit_int8.safetensors"}, None, "are not floating point"),
    ("bool-model", T2V, {M: "bad/dit_bool.safetensors"}, None, "(bool)"),
    ("int8-vae", T2V, {V: "bad/vae_int8.safetensors"}, None, "Integer / bool weight files"),
    ("wrong-shaped-model", T2V, {M: "bad/dit_wrong_shape.safetensors"}, None, "shapes that do not fit"),
    ("index-escapes-its-folder", T2V, {M: "bad/escape/diffusion_pytorch_model-00001-of-00002.safetensors"}, None,
     "names shards outside its own folder"),
    ("index-absolute-path", T2V, {M: "bad/absolute/diffusion_pytorch_model-00001-of-00002.safetensors"}, None,
     "names shards outside its own folder"),
    ("99999-shards", T2V, {M: "bad/huge-00001-of-99999.safetensors"}, None, "99998 of them"),
    # LoRAs that are not what they claim
    ("lora-1d-factors", T2V, {}, with_lora("bad/lora_1d.safetensors"), "are matrices"),
    ("lora-vector-alpha", T2V, {}, with_lora("bad/lora_vector_alpha.safetensors"), "a LoRA alpha is one number"),
    ("lora-nan", T2V, {}, with_lora("bad/lora_nan.safetensors"), "the LoRA file is damaged"),
    ("lora-bool", T2V, {}, with_lora("bad/lora_bool.safetensors"), "holds bool values"),
    # conditioning wired wrong
    ("conditioning-of-another-width", T2V, {TE: "bad/umt5_narrow.safetensors"}, None,
     "has features 32 wide but this Wan model takes umT5-XXL features (64 wide)"),
    ("combined-conditioning", T2V, {}, combined_positive, "positive conditioning holds 2 entries"),
    ("clip-end-without-start", FLF, {}, clip_end_without_start, "clip_vision_end is connected but clip_vision_start"),
    # Save Video inputs
    ("prefix-too-long", T2V, {"WanLeanSaveVideo.filename_prefix": "wan/" + "x" * 300}, None,
     "filename_prefix is too long for the file system"),
    ("empty-audio", T2V, {}, save_with_audio("bad_empty.wav"), "audio is empty (0 samples"),
]


@pytest.fixture(scope="module")
def bad_files(smoke_models):
    """Wrong, fake and broken files next to the good smoke models (folder `bad/` in each model folder)."""
    from wan_core.checkpoint import read_file
    for folder in ("diffusion_models", "vae", "text_encoders", "clip_vision", "loras"):
        os.makedirs(os.path.join(smoke_models, folder, "bad"), exist_ok=True)
    copies = {"vae_copy": "vae/wan_2.1_vae.safetensors", "umt5_copy": "text_encoders/umt5_xxl_fp16.safetensors",
              "clip_copy": "clip_vision/clip_vision_h.safetensors", "dit_copy": "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"}
    for name, src in copies.items():
        sd = read_file(os.path.join(smoke_models, src))
        for folder in ("diffusion_models", "vae", "text_encoders", "clip_vision"):
            save_file(sd, os.path.join(smoke_models, folder, "bad", name + ".safetensors"))
    _broken_weights(smoke_models, read_file)
    dm = os.path.join(smoke_models, "diffusion_models", "bad")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, os.path.join(dm, "sd15_fake.safetensors"))
    save_file({"foo.weight": torch.zeros(3), "bar.bias": torch.zeros(2)}, os.path.join(dm, "random_tensors.safetensors"))
    data = open(os.path.join(smoke_models, copies["dit_copy"]), "rb").read()
    open(os.path.join(dm, "truncated.safetensors"), "wb").write(data[: len(data) // 3])
    t5 = torch.load(os.path.join(smoke_models, "text_encoders", "models_t5_umt5-xxl-enc-bf16.pth"), weights_only=True)
    for folder in ("text_encoders", "diffusion_models"):
        torch.save(t5, os.path.join(smoke_models, folder, "bad", "models_t5_no_tokenizer.pth"))
    return smoke_models


def _broken_weights(smoke_models, read_file):
    """Damaged and wrong-kind copies of the smoke files (NaN/inf, int8/bool, a wrong shape), shard indexes naming
    files outside their folder, a lone shard of 99999, malformed LoRAs, a narrower text encoder, an empty wav."""
    dit = read_file(os.path.join(smoke_models, "diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors"))
    vae = read_file(os.path.join(smoke_models, "vae", "wan_2.1_vae.safetensors"))
    clip = read_file(os.path.join(smoke_models, "clip_vision", "clip_vision_h.safetensors"))
    dm, lora_dir = os.path.join(smoke_models, "diffusion_models", "bad"), os.path.join(smoke_models, "loras", "bad")
    os.makedirs(lora_dir, exist_ok=True)
    key = "blocks.1.ffn.0.weight"
    files = {
        (dm, "dit_nan"): {**dit, key: torch.full_like(dit[key], float("nan"))},
        (dm, "dit_int8"): {k: v.to(torch.int8) if v.ndim == 2 else v for k, v in dit.items()},
        (dm, "dit_bool"): {**dit, "blocks.0.self_attn.q.weight": dit["blocks.0.self_attn.q.weight"] > 0},
        (dm, "dit_wrong_shape"): {**dit, key: dit[key][:, :-1].contiguous()},
        ("vae", "vae_nan_decoder"): {**vae, "decoder.head.2.weight": vae["decoder.head.2.weight"] * float("nan")},
        ("vae", "vae_nan_encoder"): {**vae, "conv1.weight": vae["conv1.weight"] * float("inf")},
        ("vae", "vae_int8"): {k: v.to(torch.int8) for k, v in vae.items()},
        ("clip_vision", "clip_inf"): {**clip, "vision_model.embeddings.class_embedding":
                                      torch.full_like(clip["vision_model.embeddings.class_embedding"], float("inf"))},
    }
    q = "diffusion_model.blocks.0.self_attn.q"
    up, down = torch.randn(dit["blocks.0.self_attn.q.weight"].shape[0], 4), torch.randn(4, dit["blocks.0.self_attn.q.weight"].shape[1])
    files.update({
        (lora_dir, "lora_1d"): {f"{q}.lora_up.weight": up[:, 0].contiguous(), f"{q}.lora_down.weight": down[0].contiguous()},
        (lora_dir, "lora_vector_alpha"): {f"{q}.lora_up.weight": up, f"{q}.lora_down.weight": down,
                                          f"{q}.alpha": torch.tensor([4.0, 2.0])},
        (lora_dir, "lora_nan"): {f"{q}.lora_up.weight": up * float("nan"), f"{q}.lora_down.weight": down},
        (lora_dir, "lora_bool"): {f"{q}.lora_up.weight": up > 0, f"{q}.lora_down.weight": down > 0},
    })
    for (folder, name), sd in files.items():
        folder = folder if os.path.isabs(folder) else os.path.join(smoke_models, folder, "bad")
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, name + ".safetensors"))
    for sub, outside in (("escape", "../../wan2.1_t2v_1.3B_fp16.safetensors"),
                         ("absolute", os.path.join(smoke_models, "diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors"))):
        os.makedirs(os.path.join(dm, sub), exist_ok=True)
        shard = "diffusion_pytorch_model-00001-of-00002.safetensors"
        save_file({k: dit[k] for k in sorted(dit)[::2]}, os.path.join(dm, sub, shard))
        weight_map = {**{k: shard for k in sorted(dit)[::2]}, **{k: outside for k in sorted(dit)[1::2]}}
        with open(os.path.join(dm, sub, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    save_file(dit, os.path.join(dm, "huge-00001-of-99999.safetensors"))
    _narrow_text_encoder(os.path.join(smoke_models, "text_encoders", "bad", "umt5_narrow.safetensors"))
    import soundfile
    soundfile.write(os.path.join(SMOKE_INPUT, "bad_empty.wav"), torch.zeros(0).numpy(), 16000)


def _narrow_text_encoder(path):
    """A umT5 in ComfyUI's layout (with its tokenizer) 32 wide instead of the smoke models' 64: its features are
    what another text encoder's look like to the Wan sampler."""
    import numpy as np
    from fixtures.smoke import T5_TINY, _vocab_size, official_to_hf
    from wan_core.t5 import UMT5Encoder
    from fixtures.tokenizer import train_smoke_spm
    spm = train_smoke_spm(seed=0)
    t5 = UMT5Encoder(vocab=_vocab_size(spm), **dict(T5_TINY, dim=32))
    sd = official_to_hf({k: v.detach().half() for k, v in t5.state_dict().items()})
    sd["spiece_model"] = torch.from_numpy(np.frombuffer(spm, dtype=np.uint8).copy())
    save_file(sd, path)


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
    assert len(message) < 2000, f"{len(message)} characters: {message[:500]}..."
    assert "WanLeanSampler" in server.object_info()  # the server is still up


def test_good_workflow_runs_after_the_errors(server, bad_files):
    files = run_workflow(server, T2V, {}, sizes=SMALL)
    video = next(f for f in files if f.endswith(".mp4"))
    info = probe(video)
    assert (info["frames"], info["width"], info["height"]) == (5, 64, 64)
    assert_real_video(video)
