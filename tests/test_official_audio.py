"""The pack's S2V audio path against the official one (the `wan22` package, tests/official.py), on identical tiny
random wav2vec2 weights (a transformers Wav2Vec2ForCTC with 24 layers, so 25 hidden states as the real
wav2vec2-large-xlsr-53-english, written with save_pretrained together with its Wav2Vec2Processor) and a 16 kHz
speech-like wav file:

- features: official AudioEncoder.extract_audio_feat(return_all_layers=True) + get_audio_embed_bucket_fps(fps 16,
  80 frames per clip, m 0), arranged as speech2video.encode_audio does ([1, 25, C, clips * 80]), against the pack's
  load_audio -> prepare -> Wav2Vec2 (encode_for_clips) -> audio_buckets, as the Wan Speech To Video node runs them;
- per-clip audio embeddings: each clip's 80-frame window through the official WanModel_S2V forward (the 73-frame
  prefix, the causal audio encoder, the first 19 frames dropped: its merged_audio_emb / audio_emb_global) against the
  pack's WanS2V.encode_audio, each side fed its own features.
Everything fp32 (the official pipeline casts the bucketed features to its bf16 param dtype; not reproduced)."""
import json
import math

import numpy as np
import pytest
import safetensors.torch
import soundfile
import torch

from conftest import scale_close
from official import official_audio_encoder, official_s2v_model, run_official_s2v
from wan_core import checkpoint
from wan_core.audio import audio_buckets, clips_for, encode_for_clips, load_audio, prepare, video_frames
from wan_core.s2v import WanS2V
from wan_core.wav2vec2 import Wav2Vec2

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.cuda.amp:FutureWarning"),  # the official code's autocast
              pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning"),
              pytest.mark.usefixtures("one_thread")]

WIDTH, HEADS = 32, 2
SECONDS = 6.3  # 2 clips: T30 = 188 feature frames at 30 fps, 100 video frames with audio, the rest of clip 2 silent



def randomize(module, seed, std=0.05):
    """N(0, std) everywhere, norm gains 1 + N(0, std), weight-norm magnitudes positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g) * std
            gain = name.endswith(("norm.weight", "original0", "weight_g"))
            p.copy_(1 + r if gain else r)
    return module


@pytest.fixture(scope="module")
def wav2vec2_dir(tmp_path_factory):
    """A tiny wav2vec2-large-xlsr-53-english look-alike (layer-norm conv features, stable layer norm, 24 layers),
    saved as the official code loads it: Wav2Vec2ForCTC + Wav2Vec2Processor (normalising feature extractor and a CTC
    tokenizer, as the real model's folder holds them)."""
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)
    folder = tmp_path_factory.mktemp("wav2vec2-tiny")
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|"] + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ'"))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=WIDTH, num_hidden_layers=24, num_attention_heads=HEADS,
                            intermediate_size=64, conv_dim=(16,) * 7, feat_extract_norm="layer",
                            do_stable_layer_norm=True, conv_bias=True, num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4)
    randomize(Wav2Vec2ForCTC(config), seed=5).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    """6.3 s of speech-like 16 kHz mono PCM_16: a gliding voiced tone with harmonics, syllable-rate amplitude
    modulation, pauses and a little noise."""
    sr = 16000
    t = np.arange(int(SECONDS * sr)) / sr
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) * (np.sin(2 * np.pi * 0.23 * t) > -0.6)
    x = 0.3 * voice * envelope + 0.01 * np.random.default_rng(7).standard_normal(t.shape)
    path = str(tmp_path_factory.mktemp("speech") / "speech.wav")
    soundfile.write(path, x.astype(np.float32), sr, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def features(wav2vec2_dir, speech_wav):
    """(official [1, 25, C, clips * 80], its clip count, the pack's [1, 25, C, clips * 80], the pack's clip count)."""
    encoder = official_audio_encoder(wav2vec2_dir)
    with torch.no_grad():
        z = encoder.extract_audio_feat(speech_wav, return_all_layers=True)
        bucket, clips = encoder.get_audio_embed_bucket_fps(z, fps=16, batch_frames=80, m=0)
    official = bucket.unsqueeze(0).permute(0, 2, 3, 1)  # speech2video.encode_audio, less its bf16 cast

    from transformers import Wav2Vec2ForCTC
    sd = Wav2Vec2ForCTC.from_pretrained(wav2vec2_dir).state_dict()  # the file's tensors, `wav2vec2.`-prefixed
    model = Wav2Vec2.from_state_dict(sd, heads=HEADS).eval()
    wave, rate = load_audio(speech_wav)
    speech = prepare(wave, rate)
    mine_clips = clips_for(video_frames(speech.shape[-1]))
    with torch.no_grad():
        hidden, _ = encode_for_clips(lambda x: model(x), speech, mine_clips)
    return official, clips, audio_buckets(hidden, mine_clips * 80), mine_clips


def test_features_match_official(features):
    """Bucketed wav2vec2 features [1, 25, C, 160] equal within 1e-6 of their scale (measured 5.0e-7 over all 25
    layers; per layer at most 5.4e-7 of that layer's scale); same clip count, same silent tail."""
    official, clips, mine, mine_clips = features
    assert clips == mine_clips == 2 and official.shape == mine.shape == (1, 25, WIDTH, 160)
    frames = video_frames(int(SECONDS * 16000))
    assert frames == 100 and mine[..., :frames].abs().amax(dim=(0, 1, 2)).min() > 0
    assert not official[..., frames:].any() and not mine[..., frames:].any()
    scale_close(mine, official, rel=1e-6)
    for layer in range(25):
        scale_close(mine[:, layer], official[:, layer], rel=2e-6)


@pytest.fixture(scope="module")
def s2v_pair(tmp_path_factory):
    """A one-block S2V DiT (audio width WIDTH) from the official class, the pack's loaded from its file."""
    ref = official_s2v_model(dim=256, ffn_dim=256, num_heads=2, num_layers=1, freq_dim=256, text_dim=16,
                             audio_dim=WIDTH, audio_inject_layers=[0])
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.ndim == 1 and "norm" in name else 0.0))
        ref.casual_audio_encoder.weights.copy_(torch.linspace(0.2, 1.5, 25).view(1, 25, 1, 1))
    path = str(tmp_path_factory.mktemp("s2v") / "s2v_tiny.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    return WanS2V.from_state_dict(checkpoint.load_dit(path).sd).eval(), ref


@pytest.mark.parametrize("clip", [0, 1])
def test_per_clip_audio_embeddings_match_official(features, s2v_pair, clip):
    """Clip `clip`'s audio tokens [1, 20, 5, dim] and global vectors [1, 20, dim] from the official forward
    (merged_audio_emb, audio_emb_global) against WanS2V.encode_audio, each fed its own features: within 1e-6 of
    scale (measured: tokens 5.6e-7 / 5.6e-7, global 5.7e-7 / 4.2e-7 for clips 0 / 1; clip 1 is 1/4 speech, 3/4
    silence). Fed the official features, the pack's audio encoder gives the official embeddings (measured: 0)."""
    official, _, mine, _ = features
    ours, ref = s2v_pair
    window = slice(80 * clip, 80 * (clip + 1))
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(1, 16, 20, 8, 8, generator=g)
    run_official_s2v(ref, lat[0], torch.tensor([999]), torch.randn(5, 16, generator=g), lat[:, :, :1],
                     torch.randn(1, 16, 19, 8, 8, generator=g), torch.zeros_like(lat), official[..., window],
                     drop_motion=clip == 0)
    tokens, glob = ref.merged_audio_emb, ref.audio_emb_global
    assert tokens.shape == (1, 20, 5, 256) and glob.shape == (1, 20, 1, 256)
    with torch.no_grad():
        my_tokens, my_glob = ours.encode_audio(mine[..., window], 20)
    assert torch.isfinite(my_tokens).all() and my_tokens[..., :4, :].std() > 0.1
    scale_close(my_tokens, tokens, rel=1e-6)
    scale_close(my_glob, glob[:, :, 0], rel=1e-6)
    with torch.no_grad():
        same_tokens, same_glob = ours.encode_audio(official[..., window], 20)
    scale_close(same_tokens, tokens, rel=1e-6)
    scale_close(same_glob, glob[:, :, 0], rel=1e-6)
