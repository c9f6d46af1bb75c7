"""Odd but real inputs through the real ComfyUI server (issue 13): audio at rates AAC does not take, an audio file
overwritten under the same name, S2V at the largest seed over two clips of a long recording."""
import os

import av
import numpy as np
import pytest
import soundfile

from conftest import SMOKE_INPUT, run_workflow
from media import assert_real_video, probe
from test_bad_input import T2V, save_with_audio

T2V_AUDIO = "WanLeanLoadAudio.audio_file"


def tone(path, rate, seconds=1.0, amplitude=0.5, freq=440.0):
    t = np.arange(int(rate * seconds)) / rate
    soundfile.write(path, (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)


def t2v_with_audio(server, name):
    """The small T2V workflow with Wan Load Audio `name` wired into Wan Save Video: the written mp4."""
    from test_bad_input import prompt
    files = server.output_files(server.run(prompt(server, T2V, {}, save_with_audio(name)), timeout=300))
    return next(f for f in files if f.endswith(".mp4"))


def audio_rms(path):
    with av.open(path) as container:
        samples = np.concatenate([f.to_ndarray().ravel() for f in container.decode(container.streams.audio[0])])
    return float(np.sqrt(np.mean(samples ** 2)))


@pytest.mark.parametrize("rate, stored", [(40000, 44100), (22222, 24000)])
def test_save_video_resamples_audio_to_a_rate_aac_takes(server, rate, stored):
    name = f"wan_tone_{rate}.wav"
    tone(os.path.join(SMOKE_INPUT, name), rate)
    video = t2v_with_audio(server, name)
    info = probe(video)
    assert info["audio_rate"] == stored, info
    assert abs(info["audio_duration"] - info["duration"]) <= 1 / 16, info
    assert 0.2 < audio_rms(video) < 0.5  # the 0.5-amplitude tone (rms 0.35) survived the resampling
    assert_real_video(video)


def test_overwritten_audio_file_is_read_again(server):
    """Same graph queued twice, the wav overwritten in between (same name, same length, 5x louder): the second video
    carries the new sound (ComfyUI re-runs Wan Load Audio because its fingerprint changed) instead of a cached copy."""
    path = os.path.join(SMOKE_INPUT, "wan_overwritten.wav")
    tone(path, 16000, amplitude=0.1)
    quiet = audio_rms(t2v_with_audio(server, "wan_overwritten.wav"))
    tone(path, 16000, amplitude=0.5)
    loud = audio_rms(t2v_with_audio(server, "wan_overwritten.wav"))
    assert 4 < loud / quiet < 6, (quiet, loud)


def test_s2v_largest_seed_two_clips_of_a_long_recording(server):
    """Seed 2^64 - 1 over 2 clips (clip 1's seed wraps to 0) of a 60 s recording with max_clips 2: the video has the
    two clips' frames, is a real picture, and wav2vec2 ran on the clips' 10 s plus 1 s of context, not on 60 s."""
    speech, rate = soundfile.read(os.path.join(SMOKE_INPUT, "wan_example_speech.wav"), dtype="float32")
    long = np.tile(speech, int(np.ceil(60 * rate / len(speech))))[: 60 * rate]
    soundfile.write(os.path.join(SMOKE_INPUT, "wan_long_recording.wav"), long, rate)
    overrides = {"WanLeanSpeechToVideo.seed": 2 ** 64 - 1, "WanLeanSpeechToVideo.max_clips": 2,
                 T2V_AUDIO: "wan_long_recording.wav"}
    files = run_workflow(server, "wan22_s2v.json", overrides, sizes={"width": 64, "height": 64, "steps": 1})
    video = next(f for f in files if f.endswith(".mp4"))
    info = probe(video)
    assert info["frames"] == 2 * 80 - 3 and abs(info["audio_duration"] - info["duration"]) <= 1 / 16
    assert_real_video(video)
    assert "Wan Lean S2V: wav2vec2 encoded 176000 of 960000 samples (11.0 of 60.0 s) for 2 clip(s)" in server.log_text()
