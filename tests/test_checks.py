"""Issue 13's core checks, each where the core meets it: NaN/inf stopped where it appears (wan_core.checks), every
smoke file finite, seeds that wrap, audio the AAC encoder and wav2vec2 get, images and pose videos of odd shapes,
malformed weight files and LoRAs, shard indexes. The same cases through the real server: tests/test_bad_input.py
and tests/test_user_inputs.py."""
import glob
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from wan_core.audio import AAC_RATES, CONTEXT_SAMPLES, aac_rate, audio_buckets, encode_for_clips, from_comfy_audio
from wan_core.checkpoint import CheckpointError, read_file
from wan_core.checks import NonFiniteError, check_finite, check_weights
from wan_core.conditioning import pose_pixels, to_pixels
from wan_core.dit import WanDiT
from wan_core.lora import match_lora
from wan_core.pipeline import initial_noise
from wan_core.sampling import sample
from wan_core.wav2vec2 import conv_output_length


def test_check_finite_names_the_tensor_the_count_and_the_cause():
    x = torch.zeros(2, 3)
    assert check_finite(x, "x") is x
    x[0, 1], x[1, 2] = float("nan"), float("-inf")
    with pytest.raises(NonFiniteError, match=r"^the latent holds 2 NaN/inf values of 6: broken file$"):
        check_finite(x, "the latent", "broken file")
    assert check_finite(torch.ones(3, dtype=torch.int64), "ints") is not None


def test_sampler_stops_at_the_first_nan_step():
    """A model that turns NaN at its third call stops the run there, naming the step and the likely causes."""
    calls = []

    def denoise(x, sigma, t):
        calls.append(sigma)
        return x * float("nan") if len(calls) == 3 else x

    with pytest.raises(NonFiniteError, match=r"prediction at step 3 of 8 holds 16 NaN/inf .*damaged.*fp16.*bf16"):
        sample(denoise, torch.randn(1, 1, 1, 4, 4), steps=8)
    assert len(calls) == 3


def test_every_smoke_file_is_finite(tmp_path):
    """The smoke writer's files hold no NaN/inf (clip_vision_h once held an inf class embedding: black I2V videos).
    Written afresh: the shared smoke folder also holds the bad-input tests' deliberately broken files."""
    from fixtures.smoke import write_all
    smoke_models = write_all(str(tmp_path))
    files = [f for f in glob.glob(os.path.join(smoke_models, "**", "*"), recursive=True)
             if f.endswith((".safetensors", ".pth"))]
    assert len(files) >= 15
    for path in files:
        for key, tensor in read_file(path).items():
            if tensor.is_floating_point():
                check_finite(tensor, f"{os.path.relpath(path, smoke_models)}: {key}")


def test_seeds_wrap_modulo_2_64():
    """seed + clip past 2^64 - 1 (S2V's clip 1 at the widget's maximum seed) wraps to 0 instead of overflowing."""
    top = 2 ** 64 - 1
    assert torch.equal(initial_noise((4,), top + 1), initial_noise((4,), 0))
    assert torch.equal(initial_noise((4,), top + 5), initial_noise((4,), 4))
    assert not torch.equal(initial_noise((4,), top), initial_noise((4,), 0))


def test_aac_rates():
    assert [aac_rate(r) for r in (40000, 22222, 44100, 16000, 8, 192000)] == [44100, 24000, 44100, 16000, 7350, 96000]
    assert all(aac_rate(r) == r for r in AAC_RATES)


def test_comfy_audio_refusals():
    wave = torch.randn(1, 1, 100)
    with pytest.raises(ValueError, match="audio has a sample rate of 0 Hz"):
        from_comfy_audio({"waveform": wave, "sample_rate": 0})
    with pytest.raises(ValueError, match=r"audio is empty \(0 samples"):
        from_comfy_audio({"waveform": torch.zeros(1, 2, 0), "sample_rate": 44100})
    with pytest.raises(NonFiniteError, match="audio holds 1 NaN"):
        from_comfy_audio({"waveform": torch.cat([wave, torch.tensor([[[float("nan")]]])], -1), "sample_rate": 16000})


def test_save_video_refuses_rate_0_and_nan_frames(tmp_path):
    """The Save Video node's writer: AUDIO with sample rate 0 and NaN frames are refused before a file is opened."""
    from test_lora import pack_module
    video = pack_module("video")
    frames = torch.rand(5, 16, 16, 3)
    with pytest.raises(ValueError, match="sample rate of 0 Hz"):
        video.write_mp4(str(tmp_path / "a.mp4"), frames, 16, audio={"waveform": torch.randn(1, 1, 800), "sample_rate": 0})
    frames[2, 3, 4, 1] = float("nan")
    with pytest.raises(ValueError, match="frames holds 1 NaN/inf value of 3840"):  # the pack's own NonFiniteError
        video.write_mp4(str(tmp_path / "b.mp4"), frames, 16)
    assert not list(tmp_path.iterdir())


def test_encoder_sees_only_the_clips_audio():
    """10 minutes of audio and 1 clip: wav2vec2 runs on the clip's 5 s plus 1 s of context, and the features of the
    clip's frames come out on the whole file's interpolation grid (equal to encoding everything, for a frame-local
    stand-in encoder)."""
    n = 600 * 16000
    speech = torch.randn(n)
    fed = []

    def encode(x):  # stand-in: one feature per 320 samples, local (what wav2vec2's conv front end sees)
        fed.append(x.shape[-1])
        frames = conv_output_length(x.shape[-1])
        return x[..., : frames * 320].reshape(1, 1, frames, 320)[..., :8]

    hidden, encoded = encode_for_clips(encode, speech, clips=1)
    assert fed == [encoded] == [80 * 1000 + CONTEXT_SAMPLES]
    assert hidden.shape[-2] == conv_output_length(n)
    whole = encode(speech[None])
    assert torch.equal(audio_buckets(hidden, 80), audio_buckets(whole, 80))
    short = torch.randn(3 * 16000)  # shorter than the window: encoded whole
    assert encode_for_clips(encode, short, clips=1)[1] == short.numel()


def test_images_and_pose_videos_of_odd_shapes():
    grey = torch.rand(1, 8, 8, 1)
    assert torch.equal(pose_pixels(grey)[:, 0], pose_pixels(grey)[:, 2])  # 1-channel broadcast to grey RGB
    assert pose_pixels(grey).shape == (1, 3, 1, 8, 8)
    assert pose_pixels(torch.rand(3, 8, 8, 4)).shape == (1, 3, 3, 8, 8)  # alpha dropped
    with pytest.raises(ValueError, match="pose_video must be an IMAGE .* 1 \\(grey\\), 3 \\(RGB\\) or 4"):
        pose_pixels(torch.rand(4, 8, 8, 2))
    with pytest.raises(ValueError, match=r"start_image is empty \(1 frames of 0x0 pixels\)"):
        to_pixels(torch.rand(1, 0, 0, 3), "start_image")
    with pytest.raises(NonFiniteError, match="start_image holds 1 NaN"):
        to_pixels(torch.full((1, 4, 4, 3), 0.5).index_put_((torch.tensor([0]),) * 4, torch.tensor(float("nan"))),
                  "start_image")


def _tiny_dit_sd():
    return WanDiT(dim=128, ffn_dim=256, num_layers=1, text_dim=16).state_dict()


def test_weight_files_of_the_wrong_kind():
    sd = _tiny_dit_sd()
    with torch.device("meta"):
        expected = WanDiT(**WanDiT.config_from_state_dict(sd)).state_dict()
    check_weights(expected, sd, "ok")
    bad = {k: v.to(torch.int8) if v.ndim == 2 else v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"tiny: \d+ of its \d+ weights are not floating point: .*\(int8\).* more"):
        check_weights(expected, bad, "tiny")
    bad = {**sd, "blocks.0.ffn.2.weight": sd["blocks.0.ffn.2.weight"][:, :-1]}
    with pytest.raises(ValueError, match=r"blocks.0.ffn.2.weight \[128, 255\] \(expected \[128, 256\]\)"):
        WanDiT.from_state_dict(bad)


def test_malformed_loras_are_refused():
    sd = _tiny_dit_sd()
    q = "diffusion_model.blocks.0.self_attn.q"
    up, down = torch.randn(128, 4), torch.randn(4, 128)
    assert match_lora({f"{q}.lora_up.weight": up, f"{q}.lora_down.weight": down, f"{q}.alpha": torch.tensor(2)}, sd).patches
    cases = [({f"{q}.lora_up.weight": up[:, 0], f"{q}.lora_down.weight": down[0]}, "is 1-D .* are matrices"),
             ({f"{q}.lora_up.weight": up, f"{q}.lora_down.weight": down, f"{q}.alpha": torch.ones(4)}, "one number"),
             ({f"{q}.lora_up.weight": up * float("nan"), f"{q}.lora_down.weight": down}, "LoRA file is damaged"),
             ({f"{q}.lora_up.weight": up > 0, f"{q}.lora_down.weight": down > 0}, "holds bool values"),
             ({f"{q}.lora_up.weight": up, f"{q}.lora_down.weight": down, f"{q}.alpha": torch.tensor(True)}, "bool")]
    for lora, words in cases:
        with pytest.raises(ValueError, match=words):
            match_lora(lora, sd)


def test_shard_index_stays_in_its_folder(tmp_path):
    shard = "model-00001-of-00002.safetensors"
    save_file({"a": torch.zeros(2)}, str(tmp_path / shard))
    for outside in ("../secret.safetensors", "/etc/passwd", "sub/model-00002-of-00002.safetensors", ".."):
        with open(tmp_path / "model.safetensors.index.json", "w") as f:
            json.dump({"weight_map": {"a": shard, "b": outside}}, f)
        with pytest.raises(CheckpointError, match="names shards outside its own folder"):
            read_file(str(tmp_path / shard))


def test_missing_shards_are_counted_not_listed(tmp_path):
    path = tmp_path / "x-00001-of-99999.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError) as err:
        read_file(str(path))
    assert "99998 of them" in str(err.value) and "and 99993 more" in str(err.value) and len(str(err.value)) < 600


def test_example_speech_needs_espeak(tmp_path, monkeypatch):
    """The example speech is espeak-ng's voice or an error saying how to install it, never a stand-in buzz."""
    import example_inputs
    example_inputs.write_speech(str(tmp_path / "speech.wav"))
    assert (tmp_path / "speech.wav").stat().st_size > 10000
    monkeypatch.setattr(example_inputs.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="espeak-ng is not installed.*setup-audio.sh"):
        example_inputs.write_speech(str(tmp_path / "other.wav"))
    assert not (tmp_path / "other.wav").exists()
