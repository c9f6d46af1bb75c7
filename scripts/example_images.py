"""Example start/end images for the image-conditioned workflows, drawn on the spot (no binary files in git):
`python scripts/example_images.py DIR` writes DIR/wan_example_start.png and DIR/wan_example_end.png."""
import os
import sys

from PIL import Image, ImageDraw

NAMES = ("wan_example_start.png", "wan_example_end.png")


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


def write_examples(folder):
    """Write both example images into `folder` (idempotent); returns the folder."""
    os.makedirs(folder, exist_ok=True)
    for name, sun_x in zip(NAMES, (0.2, 0.8)):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            draw(sun_x).save(path)
    return folder


if __name__ == "__main__":
    print(write_examples(sys.argv[1] if len(sys.argv) > 1 else "input"))
