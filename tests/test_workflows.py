"""Every bundled workflow through a real ComfyUI server on smoke weights: the pack loads, every node is
there, and each workflow writes an mp4 with the asked frame count, size and fps, whose decoded pixels are a picture
(no black or flat frame, not constant: NaN/inf frames would be black)."""
import os

import pytest

from comfy_host import parse_tracebacks
from conftest import ROOT, SMOKE_INPUT, run_workflow
from media import assert_real_video, probe

WORKFLOWS = sorted(f for f in os.listdir(os.path.join(ROOT, "workflows")) if f.endswith(".json"))
# the 14B T2V run reads the official layouts instead: sharded bf16 DiT + index json, Wan2.1_VAE.pth, the umT5
# .pth with its google/umt5-xxl/ tokenizer folder beside it
OFFICIAL_FILES = {
    "WanLeanModelLoader.model_name": "Wan2.1-T2V-14B/diffusion_pytorch_model-00001-of-00002.safetensors",
    "WanLeanVAELoader.vae_name": "Wan2.1_VAE.pth",
    "WanLeanTextEncoderLoader.text_encoder_name": "models_t5_umt5-xxl-enc-bf16.pth",
}


# sampler choices some runs below use instead of their workflow's own, so that every choice runs through the server
# (the bundled workflows themselves use unipc, euler-distilled and lcm-distilled)
SAMPLER_OVERRIDES = {
    "wan21_t2v_1.3B.json": {"WanLeanSampler.sampler": "dpm++"},
    "wan21_flf2v_720p.json": {"WanLeanSampler.sampler": "euler"},
    "wan22_s2v.json": {"WanLeanSpeechToVideo.sampler": "euler-distilled", "WanLeanSpeechToVideo.cfg": 1.0},
}
PACK_NODES = {"WanLeanModelLoader", "WanLeanVAELoader", "WanLeanTextEncoderLoader", "WanLeanCLIPVisionLoader",
              "WanLeanTextEncode", "WanLeanCLIPVisionEncode", "WanLeanImageToVideo", "WanLeanSampler",
              "WanLeanSamplerA14B", "WanLeanVAEDecode", "WanLeanSaveVideo", "WanLeanLoraLoader",
              "WanLeanAudioEncoderLoader", "WanLeanLoadAudio", "WanLeanSpeechToVideo", "WanLeanParallelSampler",
              "WanLeanLongVideo"}


def test_pack_loads_without_errors(server):
    pack = {n for n in server.object_info() if n.startswith("WanLean")}
    assert pack == PACK_NODES
    assert not server.import_errors(), server.import_errors()
    startup = server.log_text().split("got prompt")[0]  # later tracebacks are other tests' deliberate errors
    assert not parse_tracebacks(startup), parse_tracebacks(startup)


def s2v_frames(max_clips):
    """Frames an S2V workflow must write for the example speech: clips of 80, the first 3 frames dropped, cut where
    the audio ends (floor(seconds x 16), as the official mp4)."""
    from wan_core.audio import clips_for, load_audio, prepare, video_frames
    wave, rate = load_audio(os.path.join(SMOKE_INPUT, "wan_example_speech.wav"))
    clips = clips_for(video_frames(prepare(wave, rate).shape[-1]))
    clips = min(clips, max_clips) if max_clips else clips
    return min(80 * clips - 3, wave.shape[-1] * 16 // rate)


# the long one renders every clip the speech needs (2 here, ~3 min on 2 cores): opt-in
S2V_WORKFLOWS = [pytest.param(w, marks=pytest.mark.slow) if "long" in w else w for w in WORKFLOWS if "s2v" in w]


@pytest.mark.parametrize("workflow", S2V_WORKFLOWS)
def test_s2v_workflow_writes_mp4_with_audio(server, workflow):
    """Real speech (espeak-ng) -> the frame count of the clip arithmetic, and an audio track as long as the video."""
    files = run_workflow(server, workflow, SAMPLER_OVERRIDES.get(workflow, {}), sizes={"width": 64, "height": 64, "steps": 2})
    video = next(f for f in files if f.endswith(".mp4"))
    info = probe(video)
    assert_real_video(video)
    expect = s2v_frames(0 if "long" in workflow else 1)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (expect, 64, 64, 16)
    assert info["audio_duration"] is not None
    assert abs(info["audio_duration"] - info["duration"]) <= 1 / 16, info


LONG_WORKFLOWS = [w for w in WORKFLOWS if "_long" in w and "s2v" not in w]


@pytest.mark.parametrize("workflow", LONG_WORKFLOWS)
def test_long_workflow_writes_mp4(server, workflow):
    """Wan Long Video: 3 clips of 13 frames overlapping by 5 -> 13 + 2 x 8 = 29 frames (the 4-step presets with their
    LoRAs on both experts at their 4 distilled steps)."""
    files = run_workflow(server, workflow, {"WanLeanLongVideo.clip_length": 13, "WanLeanLongVideo.overlap": 5},
                         sizes={"width": 64, "height": 64, "length": 29, "steps": 4 if "4step" in workflow else 2})
    video = next(f for f in files if f.endswith(".mp4"))
    info = probe(video)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (29, 64, 64, 16)
    assert_real_video(video)


@pytest.mark.parametrize("workflow", [w for w in WORKFLOWS if "s2v" not in w and w not in LONG_WORKFLOWS])
def test_workflow_writes_mp4(server, workflow):
    width, height, length = 128, 64, 5  # multiples of 32 for TI2V-5B
    distilled = "4step" in workflow or "lightx2v" in workflow  # their 4 steps: the training timesteps
    overrides = OFFICIAL_FILES if workflow == "wan21_t2v_14B.json" else {}
    files = run_workflow(server, workflow, {**overrides, **SAMPLER_OVERRIDES.get(workflow, {})},
                         sizes={"width": width, "height": height, "length": length, "steps": 4 if distilled else 3})
    videos = [f for f in files if f.endswith(".mp4")]
    assert len(videos) == 1, files
    info = probe(videos[0])
    assert (info["frames"], info["width"], info["height"]) == (length, width, height)
    assert_real_video(videos[0])  # finite, non-constant frames: a NaN video is written black
    assert info["fps"] == (24 if "ti2v" in workflow else 16)


def test_every_sampler_choice_runs_in_a_workflow_test(server):
    """Each option of the samplers' `sampler` COMBO (read from /object_info, so a new one cannot escape) is used by a
    bundled workflow or one of SAMPLER_OVERRIDES in the runs above (all sampler nodes share wan_core.sampling)."""
    import json
    from workflow_api import combo_options, ui_to_api
    info = server.object_info()
    options = set(combo_options(info["WanLeanSampler"]["input"]["required"]["sampler"]))
    for node in ("WanLeanSamplerA14B", "WanLeanSpeechToVideo", "WanLeanParallelSampler"):
        assert set(combo_options(info[node]["input"]["required"]["sampler"])) == options, node
    used = {v for o in SAMPLER_OVERRIDES.values() for k, v in o.items() if k.endswith(".sampler")}
    for name in WORKFLOWS:
        with open(os.path.join(ROOT, "workflows", name), encoding="utf-8") as f:
            api = ui_to_api(json.load(f), info)
        used |= {e["inputs"]["sampler"] for e in api.values() if "sampler" in e["inputs"]}
    assert options <= used, f"sampler choices no workflow test runs: {sorted(options - used)}"


def test_negative_prompts_are_each_models_official_default():
    """Wan Text Encode in each workflow carries its model's official default negative prompt: the Wan 2.2 configs
    (shared, S2V) read from the official code; Wan 2.1 I2V-14B prefixes 镜头晃动 (camera shake) to the shared one,
    FLF2V-14B prefixes 镜头切换 (shot change) to I2V's (Wan 2.1 wan/configs/wan_i2v_14B.py and __init__.py)."""
    import json
    from official import official
    from wan_core import tokenizer
    shared = official("configs.shared_config").wan_shared_cfg.sample_neg_prompt
    s2v = official("configs.wan_s2v_14B").s2v_14B.sample_neg_prompt
    assert tokenizer.OFFICIAL_NEGATIVE_PROMPT == shared and tokenizer.S2V_NEGATIVE_PROMPT == s2v
    assert tokenizer.I2V_NEGATIVE_PROMPT == "镜头晃动，" + shared
    assert tokenizer.FLF2V_NEGATIVE_PROMPT == "镜头切换，镜头晃动，" + shared
    want = {"wan21_i2v": tokenizer.I2V_NEGATIVE_PROMPT, "wan21_flf2v": tokenizer.FLF2V_NEGATIVE_PROMPT, "wan22_s2v": s2v}
    for name in WORKFLOWS:
        with open(os.path.join(ROOT, "workflows", name), encoding="utf-8") as f:
            nodes = [n for n in json.load(f)["nodes"] if n["type"] == "WanLeanTextEncode"]
        assert len(nodes) == 1, name
        expected = next((v for k, v in want.items() if name.startswith(k)), shared)
        assert nodes[0]["widgets_values"][1] == expected, name


def test_s2v_official_options_through_the_server(server):
    """The S2V workflow with video_length whole clips, seed_mode official and sizing official: every generated frame
    (77), at the size the official S2V picks for the example image at about 64 x 64 pixels."""
    from PIL import Image
    from wan_core.conditioning import official_s2v_size
    with Image.open(os.path.join(SMOKE_INPUT, "wan_example_start.png")) as img:
        w, h = img.size
    height, width = official_s2v_size(h, w, 64 * 64)
    files = run_workflow(server, "wan22_s2v.json", {"WanLeanSpeechToVideo.video_length": "whole clips",
                                                     "WanLeanSpeechToVideo.seed_mode": "official",
                                                     "WanLeanSpeechToVideo.sizing": "official"},
                         sizes={"width": 64, "height": 64, "steps": 2})
    info = probe(next(f for f in files if f.endswith(".mp4")))
    assert (info["frames"], info["width"], info["height"]) == (77, width, height)
    assert abs(info["audio_duration"] - info["duration"]) <= 1 / 16, info
