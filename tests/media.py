"""Inspect media files the server writes, by decoding them with PyAV (frames are counted, not read from metadata)."""
import av


def _audio_seconds(container, stream):
    """Audio length in seconds as players see it: the track's duration after its edit list (which hides the AAC
    encoder's priming samples); decoded samples / rate when the container states no duration."""
    samples = sum(frame.samples for frame in container.decode(stream))
    if stream.duration:
        return float(stream.duration * stream.time_base)
    return samples / stream.codec_context.sample_rate


def probe(path):
    """dict(frames, width, height, fps, duration, audio_duration, codec, audio_rate) of a video file.

    frames: decoded video frames; duration: frames / fps (seconds); audio_duration: the audio track's duration, or None
    when there is no audio stream (audio_rate is then None too).
    """
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        rate = video.average_rate or video.guessed_rate or video.base_rate
        fps = float(rate) if rate else None
        info = {"width": video.codec_context.width, "height": video.codec_context.height,
                "codec": video.codec_context.name, "fps": fps}
        info["frames"] = sum(1 for _ in container.decode(video))
    info["duration"] = info["frames"] / fps if fps else None
    info["audio_duration"] = info["audio_rate"] = None
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio = container.streams.audio[0]
            info["audio_rate"] = audio.codec_context.sample_rate
            info["audio_duration"] = _audio_seconds(container, audio)
    return info


def frames(path):
    """The decoded RGB frames of a video's first video stream, uint8 [T, H, W, 3]."""
    import numpy as np
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
