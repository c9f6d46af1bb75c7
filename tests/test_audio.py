"""S2V audio in: file/AUDIO io, prepare() (mono, 16 kHz, normalised), the wav2vec2 encoder (parity with ComfyUI's
native class and with HF transformers on identical random weights) and the per-frame bucketing (exactly ComfyUI's)."""
import ast
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import HOST, ROOT, import_comfy, scale_close
from wan_core import audio
from wan_core.audio import (audio_buckets, clips_for, from_comfy_audio, load_audio, prepare, resample,
                            to_comfy_audio, trim_to_video, video_frames)
from fixtures.smoke import wav2vec2_state as smoke_state_dict
from wan_core.wav2vec2 import Wav2Vec2, conv_output_length

TINY = dict(embed_dim=64, num_heads=4, num_layers=2)  # ComfyUI's class fixes conv width 512, pos conv 128/16


def randomize(module, seed):
    """N(0, 0.05) everywhere, norm gains 1 + N(0, 0.05), weight-norm magnitudes positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(1 + r if name.endswith(("norm.weight", "original0")) else r)
    return module


def tone(freq, sr, seconds, amp=0.5, phase=0.0):
    t = torch.arange(int(sr * seconds), dtype=torch.float64) / sr
    return (amp * torch.sin(2 * math.pi * freq * t + phase)).float()


@pytest.fixture(scope="module")
def comfy_model():
    import_comfy()
    import comfy.ops
    from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model
    model = Wav2Vec2Model(**TINY, do_normalize=False, operations=comfy.ops.disable_weight_init)
    return randomize(model, seed=1).eval()


@pytest.fixture(scope="module")
def wave():
    """0.3 s of prepared speech-like audio: a few tones plus noise."""
    g = torch.Generator().manual_seed(2)
    x = tone(220, 16000, 0.3) + tone(1300, 16000, 0.3, 0.2) + 0.1 * torch.randn(4800, generator=g)
    return prepare(x, 16000)


# ---------------------------------------------------------------- encoder


def test_hidden_states_match_comfy_native(comfy_model, wave):
    ours = Wav2Vec2.from_state_dict(comfy_model.state_dict(), heads=TINY["num_heads"])
    with torch.no_grad():
        last, states = comfy_model(wave[None, None])
        mine = ours(wave)
    assert mine.shape == (1, TINY["num_layers"] + 1, conv_output_length(4800), TINY["embed_dim"])
    assert len(states) == mine.shape[1]
    for i, ref in enumerate(states):
        scale_close(mine[:, i], ref)
    scale_close(mine[:, -1], last)


def test_comfy_ops_and_fp16_prefixed_file(comfy_model, wave):
    """ComfyUI's casting ops with fp16 weights stored as in a `wav2vec2.`-prefixed file: same as the fp32 model
    built from the same (fp16-rounded) weights; the weight-norm layouts are interchangeable."""
    import comfy.ops
    sd = {"wav2vec2." + k: v.half() for k, v in comfy_model.state_dict().items()}
    sd["lm_head.weight"] = torch.zeros(32, TINY["embed_dim"])
    cast = Wav2Vec2.from_state_dict(sd, ops=comfy.ops.manual_cast, heads=4)
    assert cast.feature_projection.projection.weight.dtype == torch.float16
    hub = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                              "weight_v"): v for k, v in sd.items()}
    plain = Wav2Vec2.from_state_dict(hub, heads=4)
    with torch.no_grad():
        scale_close(cast(wave), plain(wave), rel=1e-6)


def test_hidden_states_match_hf_transformers(wave):
    """The official code takes HF Wav2Vec2ForCTC(output_hidden_states=True).hidden_states under its pinned
    transformers<=4.51.3: [pos-conv output, layers 0..N-2, final LayerNorm(layer N-1)]. transformers 5 records
    the raw output of layer N-1 as the last entry instead, so the last state is checked against
    `last_hidden_state` (the final LayerNorm's output in every version; ComfyUI's last state too)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    config = Wav2Vec2Config(vocab_size=32, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=96, conv_dim=(24,) * 7, feat_extract_norm="layer",
                            do_stable_layer_norm=True, conv_bias=True, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4)
    hf = randomize(Wav2Vec2ForCTC(config), seed=3).eval()
    ours = Wav2Vec2.from_state_dict(hf.state_dict(), heads=4)
    with torch.no_grad():
        ref = hf(wave[None], output_hidden_states=True).hidden_states
        last = hf.wav2vec2(wave[None]).last_hidden_state
        mine = ours(wave)
    assert mine.shape[1] == len(ref) == 4
    for i, r in enumerate(ref[:-1]):
        scale_close(mine[:, i], r)
    scale_close(mine[:, -1], last)


def test_smoke_state_dict_layouts():
    comfy_layout = smoke_state_dict()
    hub_layout = smoke_state_dict(prefix="wav2vec2.", parametrized=False)
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original1" in comfy_layout
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_v" in hub_layout
    a, b = Wav2Vec2.from_state_dict(comfy_layout), Wav2Vec2.from_state_dict(hub_layout)
    x = torch.randn(3200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ha, hb = a(x), b(x)
    assert ha.shape == (1, 25, conv_output_length(3200), 128) and torch.equal(ha, hb)
    assert ha.std() > 0.1 and torch.isfinite(ha).all()


def test_encoder_errors(comfy_model):
    sd = comfy_model.state_dict()
    with pytest.raises(ValueError, match="not a wav2vec2"):
        Wav2Vec2.from_state_dict({"vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1)})
    group = {k: v for k, v in sd.items() if not k.startswith("feature_extractor.conv_layers.1.layer_norm")}
    with pytest.raises(ValueError, match="group-norm"):
        Wav2Vec2.from_state_dict(group)
    with pytest.raises(ValueError, match="missing .*encoder.layers.1.final_layer_norm.bias"):
        Wav2Vec2.from_state_dict({k: v for k, v in sd.items() if k != "encoder.layers.1.final_layer_norm.bias"})
    model = Wav2Vec2.from_state_dict(sd, heads=4)
    with pytest.raises(ValueError, match="too short"):
        model(torch.randn(399))
    with pytest.raises(ValueError, match=r"audio.prepare\(\)"):
        model(torch.randn(1, 2, 1600))


# ---------------------------------------------------------------- bucketing vs ComfyUI


def reference_functions():
    """ComfyUI's own bucketing functions from comfy_extras/nodes_wan.py, executed as written (importing the module
    would need ComfyUI's `nodes`, which this pack's `nodes` package shadows); node_helpers stubbed."""
    comfy = import_comfy()
    import comfy.latent_formats
    import comfy.utils
    wanted = {"linear_interpolation", "get_sample_indices", "get_audio_embed_bucket_fps", "wan_sound_to_video"}
    with open(os.path.join(HOST, "comfy_extras", "nodes_wan.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    module = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted], [])
    stub = type("NodeHelpers", (), {"conditioning_set_values": staticmethod(
        lambda cond, values, append=False: [{**(cond[0] if cond else {}), **values}])})
    namespace = {"torch": torch, "np": np, "math": math, "comfy": comfy, "node_helpers": stub}
    exec(compile(module, "nodes_wan.py", "exec"), namespace)
    assert wanted <= set(namespace)
    return namespace


@pytest.mark.parametrize("t50", [2, 49, 250, 413])  # 1 video frame, 1 s, T30 = 150 (a whole clip), 2 clips
def test_buckets_match_comfy(t50):
    ref = reference_functions()
    states = torch.randn(1, 3, t50, 8, generator=torch.Generator().manual_seed(t50))
    feat = ref["linear_interpolation"](torch.cat(tuple(states[:, i] for i in range(3))), 50, 30)
    full, clips = ref["get_audio_embed_bucket_fps"](feat, fps=16, batch_frames=80, m=0, video_rate=30)
    full = full.unsqueeze(0).permute(0, 2, 3, 1)
    mine = audio_buckets(states, num_frames=full.shape[-1])
    assert mine.shape == full.shape == (1, 3, 8, clips * 80) and torch.equal(mine, full)
    covered = audio_buckets(states)
    assert torch.equal(covered, full[..., : covered.shape[-1]]) and not full[..., covered.shape[-1]:].any()
    assert covered[..., -1].any()  # the last covered frame has audio
    # the per-clip window ComfyUI's WanSoundImageToVideo(+Extend) puts into the conditioning (length 77 -> 80)
    encoder_output = {"encoded_audio_all_layers": tuple(states[:, i] for i in range(3))}
    for r in range(clips):
        pos = ref["wan_sound_to_video"]([], [], None, 16, 16, 77, 1, frame_offset=80 * r,
                                        audio_encoder_output=encoder_output)[0]
        assert torch.equal(pos[0]["audio_embed"], mine[..., 80 * r: 80 * (r + 1)])
    # clip count: the reference asks for int(T30 / 150) + 1 clips, one all-silent extra clip only when T30 is a
    # multiple of 150; clips_for covers exactly the frames that have audio
    t30 = int(t50 / 50 * 30)
    assert clips_for(covered.shape[-1]) == clips - (t30 % 150 == 0)


def test_frame_arithmetic():
    for seconds in (1, 5, 10):
        assert video_frames(16000 * seconds) == 16 * seconds
    for n in range(720, 16000 * 12, 997):
        assert abs(video_frames(n) - n / 16000 * 16) <= 1
    assert [clips_for(f) for f in (1, 80, 81, 160, 161)] == [1, 1, 2, 2, 3]
    assert clips_for(0) == 1
    assert video_frames(720) == 1 and video_frames(719) == 0


# ---------------------------------------------------------------- prepare / resample


def test_prepare_mixes_resamples_normalises():
    a, b = tone(440, 44100, 1.0), tone(3000, 44100, 1.0, 0.3, 1.0)
    stereo = torch.stack([a, b])
    x = prepare(stereo, 44100)
    assert x.dtype == torch.float32 and x.shape == (16000,)
    assert torch.equal(x, prepare((a + b) / 2, 44100))
    assert not torch.allclose(x, prepare(a, 44100), atol=1e-2)
    assert abs(x.mean().item()) < 1e-6 and abs(x.double().var(correction=0).item() - 1) < 1e-5
    assert prepare(torch.randn(2, 44100 * 3 + 17), 44100).shape == (math.ceil((44100 * 3 + 17) * 16000 / 44100),)


def test_prepare_normalises_as_hf_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor
    x = 0.3 * torch.randn(12345, generator=torch.Generator().manual_seed(4)) + 0.05
    ref = Wav2Vec2FeatureExtractor(do_normalize=True)(x.numpy(), sampling_rate=16000, return_tensors="pt").input_values
    scale_close(prepare(x, 16000), ref[0], rel=1e-6)


@pytest.mark.parametrize("sr", [8000, 22050, 32000, 44100, 48000, 96000])
@pytest.mark.parametrize("channels", [1, 2])
def test_resample_and_prepare_equal_librosa(sr, channels, tmp_path):
    """The 16 kHz waveform is librosa.resample's (soxr HQ), bit for bit per channel; a file read as the official code
    reads it, librosa.load(path, sr=16000) (mono mix, then soxr HQ), equals load_audio + mono + resample bit for bit,
    and prepare() is that + HF's normalisation (the official extract_audio_feat) within 1e-6 of the scale."""
    import librosa
    import soundfile
    from transformers import Wav2Vec2FeatureExtractor
    g = torch.Generator().manual_seed(sr + channels)
    n = int(sr * 0.7) + 13
    t = torch.arange(n, dtype=torch.float64) / sr
    x = torch.stack([(0.4 * torch.sin(2 * math.pi * (300 + 150 * c) * t * (1 + t))).float()
                     + 0.05 * torch.randn(n, generator=g) for c in range(channels)])
    mine = resample(x, sr, 16000)
    ref = librosa.resample(x.numpy(), orig_sr=sr, target_sr=16000, res_type="soxr_hq")
    assert mine.shape == ref.shape == (channels, math.ceil(n * 16000 / sr)) and mine.abs().max() > 0.1
    assert torch.equal(mine, torch.from_numpy(ref))
    path = str(tmp_path / "x.wav")
    soundfile.write(path, x.numpy().T, sr, subtype="FLOAT")
    loaded, rate = librosa.load(path, sr=16000)
    wave, file_rate = load_audio(path)
    assert rate == 16000 and file_rate == sr
    assert torch.equal(resample(wave.mean(dim=0), file_rate, 16000), torch.from_numpy(loaded))
    official = Wav2Vec2FeatureExtractor(do_normalize=True)(loaded, sampling_rate=16000,
                                                           return_tensors="pt").input_values[0]
    scale_close(prepare(wave, file_rate), official, rel=1e-6)
    assert resample(torch.zeros(n), sr, 16000).shape == (math.ceil(n * 16000 / sr),)


def test_resample_is_band_limited():
    x = resample(tone(1000, 44100, 1.0), 44100, 16000)
    scale_close(x[400:-400], tone(1000, 16000, 1.0)[400:-400], rel=1e-3)  # passband
    alias = resample(tone(9000, 44100, 1.0), 44100, 16000)  # above 8 kHz: would fold to 7 kHz
    assert alias[400:-400].abs().max() < 1e-4
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)


@pytest.mark.parametrize("bad, words", [
    (torch.zeros(2, 0), "empty"),
    (torch.zeros(44100), "silent"),
    (1e-6 * torch.randn(2, 44100), "silent"),
    (torch.stack([tone(440, 44100, 1.0), -tone(440, 44100, 1.0)]), "cancel out"),
    (torch.tensor([0.1, float("nan"), 0.2] * 1000), "NaN"),
    (torch.tensor([0.1, float("inf"), 0.2] * 1000), "NaN or infinite"),
    (tone(440, 44100, 0.03), "too short"),
    (torch.zeros(1, 2, 100), "channels, samples"),
])
def test_prepare_errors(bad, words):
    with pytest.raises(ValueError, match=words):
        prepare(bad, 44100)


# ---------------------------------------------------------------- io


@pytest.mark.parametrize("ext, subtype, tol", [("wav", "PCM_16", 1 / 16384), ("flac", "PCM_24", 1e-6),
                                               ("ogg", "VORBIS", 0.05)])
def test_load_audio_round_trip(tmp_path, ext, subtype, tol):
    import soundfile
    stereo = torch.stack([tone(440, 44100, 0.5), tone(660, 44100, 0.5, 0.25)])
    path = str(tmp_path / f"a.{ext}")
    soundfile.write(path, stereo.T.numpy(), 44100, subtype=subtype)
    wave, sr = load_audio(path)
    assert sr == 44100 and wave.dtype == torch.float32 and wave.shape == stereo.shape
    assert (wave - stereo).abs().max() < tol


def test_load_audio_errors(tmp_path):
    with pytest.raises(ValueError, match="not found: .*missing.wav"):
        load_audio(str(tmp_path / "missing.wav"))
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(ValueError, match="cannot read audio file .*broken.wav.*wav, flac, ogg"):
        load_audio(str(bad))


def test_comfy_audio_in_and_out():
    stereo = torch.randn(1, 2, 1000)
    wave, sr = from_comfy_audio({"waveform": stereo, "sample_rate": 48000})
    assert sr == 48000 and torch.equal(wave, stereo[0])
    back = to_comfy_audio(wave, sr)
    assert torch.equal(back["waveform"], stereo) and back["sample_rate"] == 48000
    assert to_comfy_audio(wave[0], sr)["waveform"].shape == (1, 1, 1000)
    with pytest.raises(ValueError, match="batch of 2"):
        from_comfy_audio({"waveform": torch.randn(2, 1, 100), "sample_rate": 16000})
    with pytest.raises(ValueError, match="expected ComfyUI AUDIO"):
        from_comfy_audio(stereo)
    assert trim_to_video(torch.zeros(2, 96000), 48000, 16).shape == (2, 48000)
    assert trim_to_video(torch.ones(1, 1000), 16000, 16).shape == (1, 16000)  # shorter audio: silence appended


# ---------------------------------------------------------------- real speech

SENTENCE = ("Speech to video turns one picture and a voice into a talking clip. "
            "The lips follow the words, frame by frame, sixteen frames every second.")


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    """A real speech recording made by espeak-ng (installed by scripts/setup-audio.sh on first use)."""
    if shutil.which("espeak-ng") is None:
        done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup-audio.sh")], capture_output=True,
                              text=True)
        if done.returncode or shutil.which("espeak-ng") is None:
            pytest.fail(f"scripts/setup-audio.sh could not install espeak-ng:\n{done.stdout}{done.stderr}")
    path = str(tmp_path_factory.mktemp("speech") / "speech.wav")
    subprocess.run(["espeak-ng", "-w", path, SENTENCE], check=True, capture_output=True)
    return path


def test_real_speech_frame_count(speech_wav):
    wave, sr = load_audio(speech_wav)
    seconds = wave.shape[-1] / sr
    assert wave.shape[0] == 1 and 5.0 < seconds < 15.0
    x = prepare(wave, sr)
    assert x.shape == (math.ceil(wave.shape[-1] * 16000 / sr),)
    encoder = Wav2Vec2.from_state_dict(smoke_state_dict(num_layers=2))
    with torch.no_grad():
        states = encoder(x)
    buckets = audio_buckets(states)
    frames = buckets.shape[-1]
    assert buckets.shape[:3] == (1, 3, 128) and frames == video_frames(x.numel())
    assert abs(frames - seconds * 16) <= 1
    clips = clips_for(frames)
    assert (clips - 1) * 80 < frames <= clips * 80 and clips >= 2
    padded = audio_buckets(states, num_frames=clips * 80)
    assert torch.equal(padded[..., :frames], buckets) and not padded[..., frames:].any()
    assert (buckets.abs().amax(dim=(0, 1, 2)) > 0).all()  # every covered frame carries features
