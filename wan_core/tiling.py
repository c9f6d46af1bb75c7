"""VAE decode with bounded memory: spatial tiles over the latent's H/W, blended with linear ramps.

Every tile goes through the VAE's own `decode(z, progress=None)` (for Wan 2.1: the causal path, one
latent frame at a time with its 2-frame cache), so any VAE with that API tiles the same way (the
2.2 VAE too: the pixel scale is read from the first decoded tile). Tiles are written into one
preallocated output with weights that rise linearly over the overlap on every side that has a
neighbour, then normalised by the summed weights; nothing of full-video size is held but the output.

Memory: output + one tile's decode (its per-frame activations and its [B,3,T,th*s,tw*s] result).
Accuracy: the decoder's receptive field (3x3x3 convs, and the per-frame attention in the middle block,
which sees the whole tile) makes tiles differ from the untiled decode near their borders; the ramps
hide the seams. Measured on random weights, see tests/test_tiling.py for the stated tolerance.
"""
import math
import os

import torch

# Working memory of the decoder per output pixel while it decodes one latent frame (4 pixel frames), in
# values of the compute dtype. Measured as peak RSS above the loaded model (fp32, CPU, glibc told to unmap
# freed blocks at once): 5,600 for the Wan 2.1 VAE, 5,200 for Wan 2.2's (per pixel of its 16x output).
WAN21_DECODE_ELEMS_PER_PIXEL = 5600


def _starts(size, tile, overlap):
    """Start offsets of tiles of `tile` covering [0, size) with at least `overlap` shared, evenly spread."""
    if tile >= size:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(length, rise, fall):
    """Weights [length]: (i + 0.5) / rise over the first `rise` entries, mirrored over the last `fall`, 1 between."""
    w = torch.ones(length, dtype=torch.float64)
    if rise:
        w[:rise] = (torch.arange(rise, dtype=torch.float64) + 0.5) / rise
    if fall:
        down = (torch.arange(fall, 0, -1, dtype=torch.float64) - 0.5) / fall
        w[length - fall:] = torch.minimum(w[length - fall:], down)
    return w


def _check_tile(z, tile, overlap):
    """(th, tw) clipped to the latent; ValueError naming the fix for bad sizes."""
    if z.ndim != 5:
        raise ValueError(f"expected a latent [B,C,t,h,w], got shape {tuple(z.shape)}")
    th, tw = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if min(th, tw) < 1 or overlap < 0:
        raise ValueError(f"tile {tile} and overlap {overlap} must be positive; e.g. tile=(32, 32), overlap=8")
    H, W = z.shape[-2:]
    split = [n for n, size in ((th, H), (tw, W)) if n < size]  # the axes that are really tiled
    if split and 2 * overlap >= min(split):
        raise ValueError(f"overlap {overlap} needs tiles wider than twice it, got tile {(th, tw)}; "
                         f"use overlap <= {max((min(split) - 1) // 2, 0)} or larger tiles")
    return min(th, H), min(tw, W)


@torch.no_grad()
def tiled_decode(vae, z, tile=(32, 32), overlap=8, progress=None):
    """Decode latent z [B,C,t,h,w] in spatial tiles of `tile` latents (int or (h, w)), `overlap` latents shared.

    progress(done, total) counts decoded chunks over all tiles (exceptions propagate: interrupts).
    """
    th, tw = _check_tile(z, tile, overlap)
    H, W = z.shape[-2:]
    tiles = [(y, x) for y in _starts(H, th, overlap) for x in _starts(W, tw, overlap)]
    out = weight = None
    for i, (y, x) in enumerate(tiles):
        report = None if progress is None else (lambda d, n, i=i: progress(i * n + d, len(tiles) * n))
        part = vae.decode(z[..., y:y + th, x:x + tw], progress=report)
        s = part.shape[-1] // tw
        if out is None:
            out = part.new_zeros(*part.shape[:-2], H * s, W * s)
            weight = torch.zeros(H * s, W * s, dtype=torch.float64)
        w = _tile_weight(tiles, i, part.shape[-2:], s, (th, tw))
        rows, cols = slice(y * s, y * s + part.shape[-2]), slice(x * s, x * s + part.shape[-1])
        out[..., rows, cols].addcmul_(part, w.to(part))
        weight[rows, cols] += w
        del part
    return out.div_(weight.to(out))


def _tile_weight(tiles, i, size, s, tile):
    """2D weight of tile i: ramps over the pixels it shares with the neighbour on each side."""
    y, x = tiles[i]
    ys = sorted({t[0] for t in tiles})
    xs = sorted({t[1] for t in tiles})

    def axis(starts, start, length, step):
        k = starts.index(start)
        rise = (starts[k - 1] + step - start) * s if k > 0 else 0
        fall = (start + step - starts[k + 1]) * s if k + 1 < len(starts) else 0
        return _ramp(length, max(rise, 0), max(fall, 0))

    return axis(ys, y, size[0], tile[0])[:, None] * axis(xs, x, size[1], tile[1])[None, :]


def decode_bytes(h, w, t, tile=None, scale=8, elems_per_pixel=WAN21_DECODE_ELEMS_PER_PIXEL, itemsize=4):
    """Estimated peak bytes of decoding a t x h x w latent. Untiled (tile None): the working set of one chunk
    and the output held twice (the decoded chunks and their concatenation); tiled: the output, plus for one
    tile its working set and its result held twice."""
    frames = 1 + 4 * (t - 1)
    th, tw = (h, w) if tile is None else (min(tile[0], h), min(tile[1], w))
    tile_px = th * tw * scale * scale
    work = elems_per_pixel * tile_px * itemsize
    if tile is None:
        return 2 * 3 * frames * tile_px * itemsize + work
    return 3 * frames * h * w * scale * scale * itemsize + 2 * 3 * frames * tile_px * itemsize + work


def auto_tile(latent_shape, free_bytes, dtype=torch.float32, overlap=8, scale=8,
              elems_per_pixel=WAN21_DECODE_ELEMS_PER_PIXEL, step=8):
    """The tile (th, tw) in latents to decode `latent_shape` [B,C,t,h,w] within `free_bytes`, or None when
    the untiled decode fits. Largest square-ish tile (multiples of `step`) that fits; the smallest
    (2*overlap + step) when none does."""
    b, _, t, h, w = latent_shape
    per_video = torch.empty(0, dtype=dtype).element_size() * b  # bytes per element, all videos of the batch
    est = lambda tile: decode_bytes(h, w, t, tile, scale, elems_per_pixel, per_video)  # noqa: E731
    if est(None) <= free_bytes:
        return None
    smallest = 2 * overlap + step
    for side in range(max(h, w) // step * step, smallest - 1, -step):
        tile = (min(side, h), min(side, w))
        if est(tile) <= free_bytes:
            return tile
    return (min(smallest, h), min(smallest, w))


def free_memory(device):
    """Bytes free for new tensors on `device`: CUDA free + torch's cached-but-unused; CPU: MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def decode(vae, z, tile="auto", overlap=8, free_bytes=None, progress=None):
    """vae.decode with a tile choice: "auto" (from free memory), None (untiled), or an int / (h, w) in latents."""
    if isinstance(tile, str):
        if tile != "auto":
            raise ValueError(f"tile must be 'auto', None or a size in latents like (32, 32), got {tile!r}")
        free = free_memory(z.device) if free_bytes is None else free_bytes
        tile = auto_tile(tuple(z.shape), free, z.dtype, overlap, scale=getattr(vae, "STRIDE", 8))
    if tile is None:
        return vae.decode(z, progress=progress)
    return tiled_decode(vae, z, tile, overlap, progress)


def decode_retrying(vae, z, tile="auto", overlap=8, progress=None, on_oom=None, free_bytes=None):
    """`decode`, and on an out-of-memory error once more with tiles half as large (32 latents when it was untiled),
    after calling on_oom(message) so the caller can free caches and tell the user. A second failure propagates."""
    if tile == "auto":
        free = free_memory(z.device) if free_bytes is None else free_bytes
        tile = auto_tile(tuple(z.shape), free, z.dtype, overlap, scale=getattr(vae, "STRIDE", 8))
    try:
        return decode(vae, z, tile, overlap, progress=progress)
    except torch.OutOfMemoryError:
        h, w = z.shape[-2:]
        floor = 2 * overlap + 8
        size = (32, 32) if tile is None else tuple(tile) if isinstance(tile, (tuple, list)) else (tile, tile)
        smaller = tuple(min(dim, max(floor, s // 2)) for s, dim in zip(size, (h, w)))
        if on_oom:
            on_oom(f"VAE decode ran out of memory with tiles {tile or 'off'}; retrying once with {smaller[0]}x{smaller[1]}"
                   f" latent tiles (overlap {overlap})")
        return decode(vae, z, smaller, overlap, progress=progress)
