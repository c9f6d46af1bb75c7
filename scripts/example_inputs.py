"""Example inputs for the bundled workflows, made on the spot (no binary files in git):
`python scripts/example_inputs.py DIR` writes into DIR the start/end images (wan_example_start.png,
wan_example_end.png), a speech track (wan_example_speech.wav, spoken by espeak-ng: required) and a 16 fps
stick-figure pose video (wan_example_pose.mp4)."""
import math
import os
import shutil
import subprocess
import sys

import av
import numpy as np
from PIL import Image, ImageDraw

NAMES = ("wan_example_start.png", "wan_example_end.png")
SPEECH, POSE = "wan_example_speech.wav", "wan_example_pose.mp4"
SENTENCE = "Hello! This is a short test of speech to video. The lips should follow these words."


def draw(sun_x, size=(832, 480)):
    """A sky gradient, a sun at sun_x (0..1 of the width), a hill and a red house."""
    w, h = size
    img = Image.new("RGB", size)
    d = ImageDraw.Draw(img)
    for y in range(h):
        k = y / h
        d.line([(0, y), (w, y)], fill=(int(60 + 120 * k), int(120 + 90 * k), int(230 - 40 * k)))
    r, cx, cy = h // 10, int(sun_x * w), h // 4
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 220, 90))
    d.ellipse([-w // 4, int(h * 0.65), w + w // 4, int(h * 1.6)], fill=(70, 150, 70))
    d.rectangle([int(w * 0.55), int(h * 0.5), int(w * 0.7), int(h * 0.72)], fill=(180, 50, 40))
    d.polygon([(int(w * 0.53), int(h * 0.5)), (int(w * 0.625), int(h * 0.36)), (int(w * 0.72), int(h * 0.5))],
              fill=(110, 40, 30))
    return img


def write_speech(path):
    """The example sentence spoken by espeak-ng. Without espeak-ng this fails (it once fell back to a synthetic buzz,
    which silently made the S2V examples and tests listen to something that is not speech)."""
    if not shutil.which("espeak-ng"):
        raise RuntimeError("espeak-ng is not installed, and the example speech needs it: run "
                           "`bash scripts/setup-audio.sh` (Debian/Ubuntu: apt-get install espeak-ng)")
    done = subprocess.run(["espeak-ng", "-w", path, SENTENCE], capture_output=True, text=True)
    if done.returncode != 0 or not os.path.isfile(path):
        raise RuntimeError(f"espeak-ng could not write {path}: {done.stderr.strip() or done.returncode}")


def pose_frame(i, size=(416, 240)):
    """A stick figure waving its arm, frame i at 16 fps (white on black, like pose-estimator renders)."""
    w, h = size
    img = Image.new("RGB", size)
    d = ImageDraw.Draw(img)
    cx, top = w // 2, h // 6
    neck, hip = (cx, top + 30), (cx, top + 110)
    d.ellipse([cx - 16, top - 16, cx + 16, top + 16], outline=(255, 255, 255), width=3)
    d.line([neck, hip], fill=(255, 255, 255), width=4)
    angle = math.pi / 4 + 0.6 * math.sin(2 * math.pi * i / 16)
    hand = (int(neck[0] + 60 * math.cos(angle)), int(neck[1] - 60 * math.sin(angle)))
    d.line([neck, hand], fill=(255, 80, 80), width=4)
    d.line([neck, (cx - 45, neck[1] + 50)], fill=(80, 255, 80), width=4)
    for dx in (-30, 30):
        d.line([hip, (cx + dx, hip[1] + 70)], fill=(80, 80, 255), width=4)
    return np.asarray(img)


def write_pose(path, frames=48):
    with av.open(path, mode="w") as out:
        stream = out.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 416, 240, "yuv420p"
        for i in range(frames):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pose_frame(i), format="rgb24")))
        out.mux(stream.encode())


WRITERS = {NAMES[0]: lambda path: draw(0.2).save(path), NAMES[1]: lambda path: draw(0.8).save(path),
           SPEECH: write_speech, POSE: write_pose}


def write_examples(folder, names=None):
    """Write the example inputs named in `names` (default all) into `folder` (idempotent); returns the folder.
    Only the speech needs a tool beyond Python (espeak-ng), so a workflow without it never asks for one."""
    os.makedirs(folder, exist_ok=True)
    for name, write in WRITERS.items():
        if (names is None or name in names) and not os.path.exists(os.path.join(folder, name)):
            write(os.path.join(folder, name))
    return folder


if __name__ == "__main__":
    print(write_examples(sys.argv[1] if len(sys.argv) > 1 else "input"))
