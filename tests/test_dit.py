"""Wan DiT parity against ComfyUI's native WanModel on identical random weights (fp32):
t2v, i2v (CLIP branch, 36 input channels), flf2v (514-token position table), TI2V-5B-style per-token timesteps."""
import pytest
import torch

from conftest import import_comfy, scale_close
from wan_core.dit import Text, WanDiT, rope_axes
from fixtures.smoke import randomize_

TINY = dict(dim=256, ffn_dim=384, num_layers=2, text_dim=48, freq_dim=64)
VARIANTS = {
    "t2v": dict(in_dim=16, out_dim=16),
    "i2v": dict(in_dim=36, out_dim=16, clip_dim=1280),
    "flf2v": dict(in_dim=36, out_dim=16, clip_dim=1280, clip_pos_tokens=514),
    "ti2v": dict(in_dim=48, out_dim=48),
}


def native_wan(cfg):
    import_comfy()
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    return WanModel(model_type="i2v" if cfg.get("clip_dim") else "t2v", dim=cfg["dim"], ffn_dim=cfg["ffn_dim"],
                    num_layers=cfg["num_layers"], text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"],
                    num_heads=cfg["dim"] // 128, in_dim=cfg["in_dim"], out_dim=cfg["out_dim"],
                    flf_pos_embed_token_number=cfg.get("clip_pos_tokens"), operations=comfy.ops.disable_weight_init)


def make_pair(variant):
    cfg = dict(TINY, **VARIANTS[variant])
    ours = randomize_(WanDiT(**cfg), seed=1).eval()
    ref = native_wan(cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref, cfg


def inputs(cfg, grid, g):
    f, h, w = grid
    x = torch.randn(2, cfg["in_dim"], f, 2 * h, 2 * w, generator=g)
    ctx = torch.zeros(2, 512, cfg["text_dim"])
    ctx[:, :7] = torch.randn(2, 7, cfg["text_dim"], generator=g)
    clip = torch.randn(2, cfg.get("clip_pos_tokens") or 257, 1280, generator=g) if cfg.get("clip_dim") else None
    return x, ctx, clip


@pytest.mark.parametrize("variant,grid", [("t2v", (3, 6, 10)), ("t2v", (2, 4, 4)), ("i2v", (3, 6, 10)),
                                          ("flf2v", (2, 4, 6)), ("ti2v", (3, 6, 10))])
def test_forward_matches_native(variant, grid):
    ours, ref, cfg = make_pair(variant)
    g = torch.Generator().manual_seed(2)
    x, ctx, clip = inputs(cfg, grid, g)
    if variant == "ti2v":  # per-token timesteps: first-frame tokens at t=0, the rest at t
        tokens = grid[0] * grid[1] * grid[2]
        t = torch.tensor([[999.0], [437.0]]).expand(2, tokens).clone()
        t[:, : grid[1] * grid[2]] = 0
    else:
        t = torch.tensor([999.0, 437.0])
    with torch.no_grad():
        out = ours(x, t, ctx[:, :7], clip=clip)  # ours pads the context to 512 itself
        expect = ref(x, t, ctx, clip_fea=clip)
    assert out.shape == (2, cfg["out_dim"]) + x.shape[2:]
    assert out.abs().max() > 1e-2
    scale_close(out, expect)


def every_slot(model, context):
    """The official text path: zero-pad to text_len slots and embed (and attend) every one of them."""
    return Text(model.text_embedding(torch.nn.functional.pad(context, (0, 0, 0, max(0, 512 - context.shape[1])))))


@pytest.mark.parametrize("lengths", [(7, 70), (64, 1), (65, 0), (512, 3), (600, 600)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_padding_is_embedded_once(monkeypatch, lengths, dtype):
    """The zero slots past the last real text token embed to one token that attention counts once per slot (fp32: a
    log-count mask for SDPA; bf16: the token repeated): the output of attending every slot, batch items of
    different lengths together, a context longer than 512 kept whole."""
    import_comfy()
    import comfy.ops
    cfg = dict(TINY, **VARIANTS["t2v"])
    model = randomize_(WanDiT(**cfg, ops=None if dtype == torch.float32 else comfy.ops.manual_cast), seed=1).eval()
    model.to(dtype)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 16, 2, 8, 8, generator=g).to(dtype), torch.tensor([999.0, 437.0])
    ctx = torch.zeros(2, max(lengths), cfg["text_dim"])
    for i, n in enumerate(lengths):
        ctx[i, :n] = torch.randn(n, cfg["text_dim"], generator=g)
    text = model.embed_text(ctx.to(dtype))
    keep = min(max(lengths, default=1) + 63 & ~63, max(512, ctx.shape[1]))
    assert text.tokens.shape[1] == keep + (text.pads > 0) and text.pads == max(512, ctx.shape[1]) - keep
    with torch.no_grad():
        out = model(x, t, ctx.to(dtype))
        monkeypatch.setattr(WanDiT, "embed_text", every_slot)
        ref = model(x, t, ctx.to(dtype))
    if dtype == torch.float32:
        scale_close(out, ref, rel=1e-6)
    else:  # the repeated token has the bits each zero slot's own embedding has
        assert torch.equal(out, ref)


def test_i2v_y_is_concatenated_on_channels():
    ours, _, cfg = make_pair("i2v")
    g = torch.Generator().manual_seed(3)
    x, ctx, clip = inputs(cfg, (2, 4, 4), g)
    with torch.no_grad():
        assert torch.equal(ours(x[:, :16], torch.tensor([500.0] * 2), ctx, clip=clip, y=x[:, 16:]),
                           ours(x, torch.tensor([500.0] * 2), ctx, clip=clip))
        with pytest.raises(ValueError, match="needs the image conditioning"):
            ours(x[:, :16], torch.tensor([500.0] * 2), ctx, clip=clip)
        with pytest.raises(ValueError, match="needs CLIP vision tokens"):
            ours(x, torch.tensor([500.0] * 2), ctx)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_from_state_dict(variant):
    sd = WanDiT(**TINY, **VARIANTS[variant]).state_dict()
    cfg = WanDiT.config_from_state_dict(sd)
    expect = dict(TINY, patch_size=(1, 2, 2), clip_dim=None, clip_pos_tokens=None)
    expect.update(VARIANTS[variant])
    assert cfg == expect


def test_rope_split_matches_official():
    assert rope_axes(128) == (22, 21, 21)
