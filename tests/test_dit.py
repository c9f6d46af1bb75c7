"""Wan DiT (t2v) parity against ComfyUI's native WanModel on identical random weights (fp32)."""
import pytest
import torch

from conftest import import_comfy, scale_close
from wan_core.dit import WanDiT, rope_axes
from wan_core.smoke import randomize_

TINY = dict(dim=256, ffn_dim=384, num_layers=2, text_dim=48, freq_dim=64)


def native_wan(cfg):
    import_comfy()
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    return WanModel(model_type="t2v", dim=cfg["dim"], ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"],
                    text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"], num_heads=cfg["dim"] // 128,
                    in_dim=16, out_dim=16, operations=comfy.ops.disable_weight_init)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = WanDiT(**TINY)
    randomize_(ours, seed=1)
    ref = native_wan(TINY)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("grid", [(3, 6, 10), (2, 4, 4)])
def test_t2v_forward_matches_native(pair, grid):
    ours, ref = pair
    g = torch.Generator().manual_seed(2)
    f, h, w = grid
    x = torch.randn(2, 16, f, 2 * h, 2 * w, generator=g)
    t = torch.tensor([999.0, 437.0])
    ctx = torch.zeros(2, 512, TINY["text_dim"])
    ctx[:, :7] = torch.randn(2, 7, TINY["text_dim"], generator=g)
    with torch.no_grad():
        out = ours(x, t, ctx[:, :7])  # ours pads the context to 512 itself
        expect = ref(x, t, ctx)
    assert out.shape == x.shape
    assert out.abs().max() > 1e-2
    scale_close(out, expect)


def test_config_from_state_dict(pair):
    ours, _ = pair
    cfg = WanDiT.config_from_state_dict(ours.state_dict())
    assert cfg == dict(TINY, in_dim=16, out_dim=16, patch_size=(1, 2, 2))


def test_rope_split_matches_official():
    assert rope_axes(128) == (22, 21, 21)
