"""Colour anchoring for long videos: each clip's colour statistics matched to clip 0's, without moving any hue.

Chained clips drift in brightness, contrast and saturation (each clip inherits and adds to the last one's cast).
The correction works in full-range BT.601 YCbCr of the [-1, 1] RGB frames, where grey has Cb = Cr = 0:
- luma: an affine map Y' = m0 + (Y - m) * s0 / s that gives the clip the mean m0 and standard deviation s0 of
  clip 0's luma;
- chroma: both Cb and Cr scaled by one factor c0 / c (c = root mean square chroma, the clip's saturation), with no
  offset, so every pixel keeps its hue angle atan2(Cr, Cb) and only its saturation changes.
A drift of that form (luma gain and offset, saturation gain) is undone exactly; a clip whose statistics equal clip 0's
comes out unchanged up to float rounding. Hue drift (a tint) is deliberately not corrected: undoing it needs chroma
offsets, which move hues of every pixel, including the ones the scene really changed.
Statistics are over all pixels of the frames of the clip that the video keeps (long_video.kept_frames: not the ones
a join drops, such as the start image SVI 2.0 Pro re-creates at the head of every clip).
"""
import torch

# RGB -> (Y, Cb, Cr), full-range BT.601 (the JPEG matrix); rows of Cb and Cr sum to 0 (grey has no chroma)
_TO_YCC = torch.tensor([[0.299, 0.587, 0.114],
                        [-0.168736, -0.331264, 0.5],
                        [0.5, -0.418688, -0.081312]], dtype=torch.float64)
_FROM_YCC = torch.linalg.inv(_TO_YCC)
EPS = 1e-6  # below this a statistic counts as zero (a flat grey clip): nothing is scaled by it


def _mix(matrix, frames):
    """A 3x3 colour matrix applied to frames [3, ...], in float64."""
    return torch.einsum("ij,j...->i...", matrix, frames.double())


def colour_stats(frames):
    """(luma mean, luma std, chroma rms) of frames [3, T, H, W] in [-1, 1], as float64 Python numbers."""
    ycc = _mix(_TO_YCC, frames)
    y, chroma = ycc[0], ycc[1:]
    return y.mean().item(), y.std(unbiased=False).item(), chroma.pow(2).sum(0).mean().sqrt().item()


def match_colour(frames, reference, stats=None):
    """frames [3, T, H, W] with their luma mean / std and chroma rms (`stats`, default colour_stats(frames)) mapped
    to `reference` (colour_stats of clip 0)."""
    mean, std, rms = stats or colour_stats(frames)
    mean0, std0, rms0 = reference
    ycc = _mix(_TO_YCC, frames)
    gain = std0 / std if std > EPS and std0 > EPS else 1.0
    ycc[0] = mean0 + (ycc[0] - mean) * gain
    if rms > EPS and rms0 > EPS:
        ycc[1:] *= rms0 / rms
    return _mix(_FROM_YCC, ycc).to(frames.dtype)
