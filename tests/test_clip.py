"""CLIP ViT image encoder: parity with ComfyUI's native CLIP vision model, both key layouts, errors."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import import_comfy, scale_close
from wan_core.clip import WanCLIPVision, clip_preprocess

DIM, HEADS, LAYERS, PATCH, GRID = 64, 4, 3, 14, 4
SIZE = PATCH * GRID  # 56 px: a 4x4 patch grid + class token = 17 tokens
TOKENS = GRID * GRID + 1


def hf_state_dict(seed=0):
    """Random CLIP vision weights in HF / ComfyUI clip_vision_h layout (incl. post norm and projection)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std  # noqa: E731
    p = "vision_model."
    # embeddings of ~0.005 rms: the pre-LN sees a variance near eps, so a wrong LayerNorm eps shows
    e = p + "embeddings."
    sd = {e + "class_embedding": rnd(DIM, std=0.005),
          e + "position_embedding.weight": rnd(TOKENS, DIM, std=0.005),
          e + "patch_embedding.weight": rnd(DIM, 3, PATCH, PATCH, std=3e-4), "visual_projection.weight": rnd(32, DIM, std=0.1)}
    for norm in ("pre_layrnorm", "post_layernorm"):
        sd.update({f"{p}{norm}.weight": 1 + rnd(DIM, std=0.2), f"{p}{norm}.bias": rnd(DIM, std=0.1)})
    for i in range(LAYERS):
        b = f"{p}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            sd.update({b + norm + ".weight": 1 + rnd(DIM, std=0.2), b + norm + ".bias": rnd(DIM, std=0.1)})
        shapes = {f"self_attn.{n}_proj": (DIM, DIM) for n in ("q", "k", "v", "out")}
        shapes.update({"mlp.fc1": (4 * DIM, DIM), "mlp.fc2": (DIM, 4 * DIM)})
        for name, (o, i_) in shapes.items():
            sd.update({b + name + ".weight": rnd(o, i_, std=i_ ** -0.5), b + name + ".bias": rnd(o, std=0.1)})
    return sd


BLOCK_NAMES = (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
               ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2"))


def official_state_dict(hf):
    """The same weights in the official Wan .pth layout (whole XLM-R CLIP: `visual.*` + text tower keys)."""
    v, p = "visual.", "vision_model."
    sd = {v + "patch_embedding.weight": hf[p + "embeddings.patch_embedding.weight"],
          v + "cls_embedding": hf[p + "embeddings.class_embedding"].view(1, 1, DIM),
          v + "pos_embedding": hf[p + "embeddings.position_embedding.weight"].view(1, TOKENS, DIM),
          v + "head": hf["visual_projection.weight"].t().contiguous(),
          "log_scale": torch.tensor(2.6), "textual.token_embedding.weight": torch.zeros(10, 8)}
    for ours, theirs in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
        sd.update({f"{v}{ours}.{t}": hf[f"{p}{theirs}.{t}"] for t in ("weight", "bias")})
    for i in range(LAYERS):
        a, b = f"{v}transformer.{i}.", f"{p}encoder.layers.{i}."
        for t in ("weight", "bias"):
            sd[a + "attn.to_qkv." + t] = torch.cat([hf[f"{b}self_attn.{n}_proj.{t}"] for n in "qkv"])
            for ours, theirs in BLOCK_NAMES:
                sd[f"{a}{ours}.{t}"] = hf[f"{b}{theirs}.{t}"]
    return sd


def comfy_config(tmp_path):
    """clip_vision_config_h.json of the host tree, scaled down."""
    with open(import_comfy().__path__[0] + "/clip_vision_config_h.json") as f:
        config = json.load(f)
    config.update(hidden_size=DIM, intermediate_size=4 * DIM, num_attention_heads=HEADS,
                  num_hidden_layers=LAYERS, image_size=SIZE, projection_dim=32)
    path = tmp_path / "clip_vision_tiny.json"
    path.write_text(json.dumps(config))
    return config, str(path)


def smooth_image(h, w, seed=1):
    """A photo-like ComfyUI IMAGE [1,h,w,3] in [0,1], 8-bit: low-frequency content, no pixel noise."""
    g = torch.Generator().manual_seed(seed)
    img = F.interpolate(torch.rand(1, 3, 6, 5, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return (img.clamp(0, 1) * 255).round().div(255).movedim(1, -1)


@pytest.fixture(scope="module")
def hf():
    return hf_state_dict()


@pytest.fixture(scope="module")
def ours(hf):
    return WanCLIPVision.from_state_dict(hf, heads=HEADS)


def test_tokens_match_comfy_native_model(hf, ours, tmp_path):
    comfy = import_comfy()
    import comfy.clip_model
    import comfy.ops
    config, _ = comfy_config(tmp_path)
    ref = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "cpu", comfy.ops.manual_cast)
    ref.load_state_dict(hf, strict=True)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        last, penultimate, _, _ = ref(pixel_values=pixels, intermediate_output=-2)
        tokens = ours.forward_preprocessed(pixels)
    assert tokens.shape == (2, TOKENS, DIM) and len(ours.encoder["layers"]) == LAYERS - 1
    scale_close(tokens, penultimate)
    assert (tokens - last).abs().max() > 0.1 * last.abs().max()  # the last block is really left out


def test_encode_image_matches_comfy_clip_vision_output(hf, ours, tmp_path, monkeypatch):
    """ComfyUI's whole CLIPVisionEncode path (preprocess + model + Output) on an image already at the model's
    size: its preprocessing is then only 8-bit rounding of an 8-bit image, so the tokens agree."""
    comfy = import_comfy()
    import comfy.cli_args
    import comfy.clip_vision
    monkeypatch.setattr(comfy.cli_args.args, "fp32_text_enc", True)  # CPU default would store fp16
    clip = comfy.clip_vision.ClipVisionModel(comfy_config(tmp_path)[1])
    clip.load_sd(hf)
    image = torch.cat([smooth_image(SIZE, SIZE, seed=s) for s in (1, 2)])
    with torch.no_grad():
        out = clip.encode_image(image, crop=True)
        tokens = ours(image.movedim(-1, 1) * 2 - 1)
    scale_close(tokens, out.penultimate_hidden_states)  # ComfyUI's CLIP_VISION_OUTPUT is our tokens as they are


def test_preprocess_vs_comfy():
    """Same normalisation; when resizing, ComfyUI's antialiased (a=-0.5) 8-bit result differs from the
    official plain bicubic (a=-0.75) stretch by a few percent of the range, and centre-crops by default."""
    import_comfy()
    from comfy.clip_vision import clip_preprocess as comfy_preprocess
    same = smooth_image(SIZE, SIZE)
    scale_close(clip_preprocess(same.movedim(-1, 1) * 2 - 1, SIZE), comfy_preprocess(same, size=SIZE), rel=1e-6)

    image = smooth_image(120, 90)
    ours = clip_preprocess(image.movedim(-1, 1) * 2 - 1, SIZE)
    theirs = comfy_preprocess(image, size=SIZE, crop=False)
    diff = (ours - theirs).abs()
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE)
    assert 1e-3 < diff.mean() < 0.02 and diff.max() < 0.15, (diff.mean(), diff.max())  # measured 0.0047 / 0.028
    cropped = comfy_preprocess(image, size=SIZE, crop=True)
    assert (ours - cropped).abs().mean() > 5 * diff.mean()  # ComfyUI's default crop="center" is another picture
    plain = F.interpolate(image.movedim(-1, 1), size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    scale_close(ours, (plain - mean) / std, rel=1e-5)  # resizing in [-1,1] == resizing in [0,1] (linear)


def test_official_layout_gives_identical_tokens(hf, ours):
    sd = official_state_dict(hf)
    official = WanCLIPVision.from_state_dict(sd, heads=HEADS)
    pixels = torch.rand(1, 3, 70, 50, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(official(pixels), ours(pixels))
    qkv = sd["visual.transformer.0.attn.to_qkv.weight"]  # split into views, not copied
    assert official.encoder["layers"][0].self_attn.k_proj.weight.data_ptr() == qkv[DIM:].data_ptr()


def test_prefixed_and_cast_weights(hf, ours):
    """A key prefix (e.g. `clip_vision.`) is stripped; fp16 storage with ComfyUI's casting ops stays fp16."""
    comfy = import_comfy()
    import comfy.ops
    sd = {"clip_vision." + k: v.half() for k, v in hf.items()}
    model = WanCLIPVision.from_state_dict(sd, ops=comfy.ops.manual_cast, heads=HEADS)
    assert model.encoder["layers"][0].mlp.fc1.weight.dtype == torch.float16
    pixels = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        scale_close(model(pixels), ours(pixels), rel=2e-2)


@pytest.mark.parametrize("sd, words", [
    ({"blocks.0.self_attn.q.weight": torch.zeros(1), "head.modulation": torch.zeros(1)}, "not a CLIP vision model"),
    ({"decoder.conv1.weight": torch.zeros(1)}, "video VAE"),
    ({"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)}, "open_clip-layout"),
    ({}, "clip_vision_h.safetensors"),
])
def test_wrong_file_is_a_clear_error(sd, words):
    with pytest.raises(ValueError, match=words):
        WanCLIPVision.from_state_dict(sd)


def test_incomplete_or_misused_inputs(hf, ours):
    broken = {k: v for k, v in hf.items() if "layers.1.mlp.fc2" not in k}
    with pytest.raises(ValueError, match=r"missing \['encoder.layers.1.mlp.fc2.weight'"):
        WanCLIPVision.from_state_dict(broken, heads=HEADS)
    with pytest.raises(ValueError, match="movedim"):
        ours(torch.rand(1, SIZE, SIZE, 3))
    with pytest.raises(ValueError, match="forward"):
        ours.forward_preprocessed(torch.rand(1, 3, 224, 224))
