"""Audio in for Wan2.2-S2V: reading, preparing for wav2vec2, and turning its features into per-video-frame buckets.

Pipeline (official wan/modules/s2v/audio_encoder.py + wan/speech2video.py; ComfyUI's WanSoundImageToVideo):
  load_audio / from_comfy_audio -> prepare (mono, 16 kHz, zero mean / unit variance) -> wav2vec2.Wav2Vec2
  (25 hidden states at 50 Hz) -> audio_buckets: linear interpolation to 30 fps, then one feature vector per 16-fps
  video frame -> the S2V DiT's audio input [1, 25, 1024, frames], sliced per clip of 80 frames.

Resampling is the official one: the official code reads audio with librosa.load(path, sr=16000), which mixes to
mono (channel mean, float32), resamples each row with soxr's "HQ" quality (soxr.resample(y, sr, 16000,
quality="soxr_hq"), float32 in and out) and cuts or zero-pads the result to ceil(N * 16000 / sr) samples
(librosa.resample's fix_length). `resample` makes the same soxr call and the same length fix, so the 16 kHz waveform
equals librosa's bit for bit (tests/test_audio.py, against soxr at 8 / 22.05 / 32 / 44.1 / 48 / 96 kHz, mono and
stereo). The pack's earlier Kaiser-windowed sinc was 2.0e-3 (speech, 22.05 kHz) to 9.5e-3 (white noise, 44.1 kHz)
of the peak away from it; ComfyUI's torchaudio default (Hann, 6 zero crossings) 3.9e-2 and 1.7e-1.

Normalisation is HF Wav2Vec2FeatureExtractor's (do_normalize): (x - mean) / sqrt(var + 1e-7), population variance.
ComfyUI normalises inside its model with torch's unbiased variance: a factor sqrt(1 - 1/N) apart.

Frame arithmetic (fps 16, video_rate 30, 50 Hz features, all as the reference):
  N samples at 16 kHz -> T50 = wav2vec2.conv_output_length(N) (16000 -> 49)
  -> T30 = int(T50 / 50 * 30) feature frames at 30 fps (linear, align_corners=True)
  -> video frame j takes feature round(j / 16 * 30) (round half to even, as numpy), zeros once that is >= T30.
  `video_frames(N)` counts the frames that get audio (1 s -> 16, 5 s -> 80, 10 s -> 160); the frame count is
  within one frame of duration * 16. `clips_for(frames)` clips of 80 cover them. The official generator asks
  for int(T30 / 150) + 1 clips, one more (all-silent) clip only when T30 is an exact multiple of 150, and
  returns clips * 80 - 3 frames (clip 0 drops 3 frames decoded next to the reference latent).
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_finite
from .wav2vec2 import conv_output_length

SAMPLE_RATE = 16000  # wav2vec2 input
FEATURE_RATE = 50  # wav2vec2 frames per second, as the reference counts them
VIDEO_RATE = 30  # the intermediate rate the reference interpolates the features to
FPS = 16  # S2V video frame rate
FRAMES_PER_CLIP = 80
SILENCE = 1e-4  # peak below this (-80 dBFS) counts as silent
MIN_SAMPLES = 720  # 45 ms at 16 kHz: two wav2vec2 frames, the least that yields one video frame
EXTENSIONS = "wav, flac, ogg (and mp3 with libsndfile >= 1.1)"
# file extension -> libsndfile's major format that reads it (m4a/aac: none, libsndfile has no AAC decoder)
SOUNDFILE_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".opus": "OGG", ".mp3": "MP3", ".aiff": "AIFF",
                     ".aif": "AIFF"}


def readable_extensions():
    """The audio file extensions load_audio can read with the installed libsndfile (mp3 only from 1.1 on)."""
    import soundfile
    have = soundfile.available_formats()
    return tuple(ext for ext, fmt in SOUNDFILE_FORMATS.items() if fmt in have)


def load_audio(path):
    """Read an audio file with soundfile -> (waveform [channels, samples] float32, sample_rate)."""
    import soundfile  # imported here so the model code does not need it

    if not os.path.isfile(path):
        raise ValueError(f"audio file not found: {path}")
    try:
        data, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile.LibsndfileError and friends
        raise ValueError(f"cannot read audio file {path!r} ({e}); supported formats: {EXTENSIONS}") from e
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sample_rate)


def from_comfy_audio(audio, name="audio"):
    """ComfyUI's AUDIO ({"waveform": [1, C, N], "sample_rate": int}) -> (waveform [C, N] float32, sample_rate).
    Refused, naming input `name`: a batch of clips, no samples, a sample rate <= 0, NaN/inf samples."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError(f"{name}: expected ComfyUI AUDIO, a dict with 'waveform' [batch, channels, samples] and "
                         "'sample_rate'")
    wave = torch.as_tensor(audio["waveform"])
    if wave.ndim == 3:
        if wave.shape[0] != 1:
            raise ValueError(f"{name} holds a batch of {wave.shape[0]} clips; one is used: pick or join them first")
        wave = wave[0]
    if wave.ndim != 2:
        raise ValueError(f"{name}: AUDIO waveform must be [batch, channels, samples], got shape {tuple(wave.shape)}")
    rate = int(audio["sample_rate"])
    if rate <= 0:
        raise ValueError(f"{name} has a sample rate of {rate} Hz: the node that made it is broken; load the file "
                         "with Wan Load Audio or ComfyUI's Load Audio")
    if wave.shape[0] == 0 or wave.shape[1] == 0:
        raise ValueError(f"{name} is empty ({wave.shape[1]} samples, {wave.shape[0]} channels, 0 seconds): "
                         "give a recording with sound in it, or disconnect it")
    check_finite(wave, name, "the audio file or the node that made it is broken")
    return wave.detach().float().cpu(), rate


# sample rates the AAC encoder takes (MPEG-4 sampling frequency table)
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


def aac_rate(rate):
    """The rate an AAC track stores audio of `rate` Hz at: the rate itself when AAC takes it, else the next one up
    (40 kHz -> 44.1 kHz, 22,222 Hz -> 24 kHz), 96 kHz for anything above (nothing is lost but what is inaudible)."""
    return next((r for r in AAC_RATES if r >= rate), AAC_RATES[-1])


def to_comfy_audio(waveform, sample_rate):
    """(waveform [C, N] or [N], sample_rate) -> ComfyUI's AUDIO dict."""
    wave = torch.as_tensor(waveform).float()
    wave = wave[None] if wave.ndim == 1 else wave
    return {"waveform": wave[None].cpu(), "sample_rate": int(sample_rate)}


def trim_to_video(waveform, sample_rate, num_frames, fps=FPS):
    """waveform [..., N] cut, or padded with silence, to exactly num_frames / fps seconds (the audio track of a
    video whose last clip may run past the end of the speech)."""
    n = round(num_frames * sample_rate / fps)
    return torch.nn.functional.pad(waveform[..., :n], (0, max(0, n - waveform.shape[-1])))


def resample(x, orig_sr, new_sr):
    """x [..., N] from orig_sr to new_sr -> [..., ceil(N * new_sr / orig_sr)] float32, as librosa.resample(x, orig_sr,
    new_sr) does it (its default res_type "soxr_hq"): soxr's HQ resampler on each row in float32, then cut or
    zero-padded to librosa's length."""
    import soxr  # imported here so the model code does not need it

    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    x = torch.as_tensor(x).float()
    if orig_sr == new_sr:
        return x
    rows = x.detach().cpu().reshape(-1, x.shape[-1]).numpy()
    size = int(np.ceil(x.shape[-1] * (float(new_sr) / orig_sr)))  # librosa's expression for the length
    out = np.zeros((rows.shape[0], size), dtype=np.float32)
    for row, y in zip(rows, out):
        r = soxr.resample(np.ascontiguousarray(row), orig_sr, new_sr, quality="soxr_hq")[:size]
        y[:r.shape[0]] = r
    return torch.from_numpy(out).reshape(*x.shape[:-1], size).to(x.device)


def prepare(waveform, sample_rate):
    """Audio [channels, samples] or [samples] at any rate -> the wav2vec2 input [N16k] float32:
    mono mix (channel mean), resampled to 16 kHz, zero mean / unit variance (population variance, eps 1e-7)."""
    wave = torch.as_tensor(waveform)
    wave = wave[None] if wave.ndim == 1 else wave
    if wave.ndim != 2:
        raise ValueError(f"audio must be [channels, samples] or [samples], got shape {tuple(wave.shape)}")
    if wave.shape[-1] == 0 or wave.shape[0] == 0:
        raise ValueError("the audio is empty (no samples): give a recording with speech or singing in it")
    if not torch.isfinite(wave).all():
        raise ValueError("the audio contains NaN or infinite samples: the file or the upstream node is broken")
    mono = wave.float().mean(dim=0)
    peak = mono.abs().max().item()
    if peak < SILENCE:
        raise ValueError(f"the audio is silent (peak {peak:.1e}, below {SILENCE:g}"
                         f"{'; its channels cancel out when mixed to mono' if wave.abs().max() >= SILENCE else ''}): "
                         "S2V needs speech or singing to follow")
    x = resample(mono, sample_rate, SAMPLE_RATE).double()
    if x.numel() < MIN_SAMPLES:
        raise ValueError(f"the audio is too short ({x.numel() / SAMPLE_RATE * 1000:.0f} ms): it needs at least "
                         f"{MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms to give one video frame")
    return ((x - x.mean()) / torch.sqrt(x.var(correction=0) + 1e-7)).float()


def to_video_rate(features, feature_rate=FEATURE_RATE, video_rate=VIDEO_RATE):
    """[L, T, D] features at feature_rate -> [L, int(T / feature_rate * video_rate), D], linear, align_corners=True."""
    size = int(features.shape[1] / float(feature_rate) * video_rate)
    if size < 1:
        raise ValueError(f"{features.shape[1]} audio feature frames are too few for one frame at {video_rate} fps")
    out = F.interpolate(features.transpose(1, 2), size=size, mode="linear", align_corners=True)
    return out.transpose(1, 2)


def frame_indices(num_frames, fps=FPS, video_rate=VIDEO_RATE):
    """For each video frame j, the index of its feature at video_rate: round(j / fps * video_rate), half to even."""
    return torch.round(torch.arange(num_frames, dtype=torch.float64) / fps * video_rate).long()


def _covered(num_features, fps, video_rate):
    """Video frames whose feature index falls inside num_features features at video_rate."""
    return int((frame_indices(math.ceil(num_features * fps / video_rate) + 2, fps, video_rate) < num_features).sum())


def video_frames(num_samples, fps=FPS):
    """Video frames that prepared 16 kHz audio of num_samples samples gives audio to (1 s -> 16)."""
    t30 = int(conv_output_length(num_samples) / float(FEATURE_RATE) * VIDEO_RATE)
    return _covered(t30, fps, VIDEO_RATE)


def clips_for(num_frames, frames_per_clip=FRAMES_PER_CLIP):
    """Clips of frames_per_clip frames needed to cover num_frames video frames (at least one)."""
    return max(1, -(-int(num_frames) // frames_per_clip))


CONTEXT_SAMPLES = SAMPLE_RATE  # audio encoded past the last clip's end: 1 s of context for wav2vec2's attention


def encode_for_clips(encode, speech, clips, frames_per_clip=FRAMES_PER_CLIP, fps=FPS):
    """wav2vec2 hidden states [..., T50, D] for the first `clips` clips of prepared 16 kHz speech [N]: `encode` ([1, n]
    -> [..., T, D]) runs only on the samples those clips use plus CONTEXT_SAMPLES (not a whole long recording), and
    the result is zero-padded in time to the whole audio's frame count, so the 30-fps interpolation grid of
    audio_buckets is exactly the whole file's. The kept frames differ from a whole-file encode only by what
    wav2vec2's attention would have seen more than 1 s past them. Returns (hidden, samples encoded)."""
    n = speech.shape[-1]
    window = min(n, math.ceil(clips * frames_per_clip * SAMPLE_RATE / fps) + CONTEXT_SAMPLES)
    hidden = encode(speech[None, :window])
    missing = conv_output_length(n) - hidden.shape[-2]
    return (F.pad(hidden, (0, 0, 0, missing)) if missing > 0 else hidden), window


def audio_buckets(hidden_states, num_frames=None, fps=FPS):
    """wav2vec2 hidden states [L, T50, D] (or [1, L, T50, D]) -> the S2V audio input [1, L, D, num_frames].

    Frame j holds the 30-fps feature round(j / fps * 30), or zeros once the audio has ended. num_frames defaults
    to the frames the audio covers; pass clips * 80 to pad to whole clips (clip r is [..., 80 r : 80 (r + 1)])."""
    if hidden_states.ndim == 4 and hidden_states.shape[0] == 1:
        hidden_states = hidden_states[0]
    if hidden_states.ndim != 3:
        raise ValueError(f"expected wav2vec2 hidden states [layers, frames, width], got {tuple(hidden_states.shape)}")
    feats = to_video_rate(hidden_states)
    covered = _covered(feats.shape[1], fps, VIDEO_RATE)
    num_frames = covered if num_frames is None else int(num_frames)
    out = feats.new_zeros(feats.shape[0], num_frames, feats.shape[2])
    n = min(covered, num_frames)
    out[:, :n] = feats[:, frame_indices(n, fps)]
    return out.permute(0, 2, 1)[None]
