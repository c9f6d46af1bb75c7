"""umT5 encoder + tokenizer: parity with ComfyUI's native T5 / SPiece tokenizer, layouts, locate()."""
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import import_comfy, scale_close
from wan_core.checkpoint import load_text_encoder
from wan_core.t5 import UMT5Encoder, encode_text, hf_to_official, relative_buckets
from fixtures.tokenizer import train_smoke_spm
from wan_core.tokenizer import OFFICIAL_NEGATIVE_PROMPT, UMT5Tokenizer, clean_prompt

DIM, HEADS, FFN, LAYERS, BUCKETS = 64, 4, 96, 2, 32
EN = "a red fox runs across a snowy forest, cinematic lighting, 4k"
ZH = "一只红色的狐狸奔跑穿过白雪覆盖的森林，电影感光影"


@pytest.fixture(scope="module")
def spm():
    return train_smoke_spm()


@pytest.fixture(scope="module")
def tok(spm):
    return UMT5Tokenizer(spm)


def hf_state_dict(vocab, seed=0):
    """Random umT5 encoder weights in HF layout; large enough that every part shapes the output."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std  # noqa: E731
    sd = {"shared.weight": rnd(vocab, DIM), "encoder.final_layer_norm.weight": 1 + rnd(DIM, std=0.2)}
    for i in range(LAYERS):
        p = f"encoder.block.{i}.layer."
        sd.update({p + "0.layer_norm.weight": 1 + rnd(DIM, std=0.2), p + "1.layer_norm.weight": 1 + rnd(DIM, std=0.2),
                   p + "0.SelfAttention.relative_attention_bias.weight": rnd(BUCKETS, HEADS),
                   p + "1.DenseReluDense.wo.weight": rnd(DIM, FFN, std=FFN ** -0.5)})
        for name in "qkvo":
            sd[p + f"0.SelfAttention.{name}.weight"] = rnd(DIM, DIM, std=DIM ** -0.5)
        for name in ("wi_0", "wi_1"):
            sd[p + f"1.DenseReluDense.{name}.weight"] = rnd(FFN, DIM, std=DIM ** -0.5)
    return sd


def comfy_t5(sd, vocab):
    """ComfyUI's native T5 class configured as umt5 (as umt5_config_xxl.json does), scaled down."""
    comfy = import_comfy()
    import comfy.ops
    import comfy.text_encoders.t5 as ct5

    config = {"d_ff": FFN, "d_kv": DIM // HEADS, "d_model": DIM, "num_heads": HEADS, "num_layers": LAYERS,
              "vocab_size": vocab, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "umt5"}
    model = ct5.T5(config, torch.float32, "cpu", comfy.ops.manual_cast)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_relative_buckets_match_comfy():
    import_comfy()
    from comfy.text_encoders.t5 import T5Attention

    rel = torch.arange(600)[None, :] - torch.arange(520)[:, None]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    ours = relative_buckets(520, 600)
    assert torch.equal(ours, ref)
    assert ours.unique().numel() == 31  # all but bucket 16 (= distance +0, which counts as 0): far ones reached


def test_rms_norm_matches_comfy():
    """Tiny-RMS input so that eps (1e-6) matters; gamma cast at use from a bf16 parameter."""
    import_comfy()
    from comfy.text_encoders.t5 import T5LayerNorm as RefNorm

    from wan_core.t5 import T5LayerNorm

    x = torch.randn(2, 7, DIM) * 1e-3
    ours, ref = T5LayerNorm(DIM), RefNorm(DIM)
    with torch.no_grad():
        ref.weight.copy_(1 + torch.randn(DIM) * 0.2)
        ours.weight.copy_(ref.weight)
        scale_close(ours(x), ref(x), rel=1e-6)
        ours.weight.data = ours.weight.data.bfloat16()
        assert ours(x).dtype == torch.float32


def test_parity_with_comfy_t5(tok):
    """Same HF weights into ComfyUI's T5 and (converted) into ours, padded batch of EN + ZH.

    ComfyUI masks padded keys with an additive -finfo.max, the official code fills -finfo.min: the
    same key-only mask, so even padded query rows agree (ComfyUI's SDClipModel zeroes those rows
    afterwards, the official encoder trims them: they are never used)."""
    vocab = tok.sp.get_piece_size()
    sd = hf_state_dict(vocab)
    ids, mask = tok([EN, ZH, OFFICIAL_NEGATIVE_PROMPT])
    with torch.no_grad():
        ref = comfy_t5(sd, vocab)(ids, mask, dtype=torch.float32)[0]
        ours = UMT5Encoder.from_state_dict(sd)(ids, mask)
    assert ours.dtype == torch.float32 and ours.shape == (3, 512, DIM)
    scale_close(ours, ref)
    real = mask.bool()
    scale_close(ours[real], ref[real])
    assert ours[0, 0].sub(ours[1, 0]).abs().max() > 1e-2  # outputs depend on the tokens


def test_padding_does_not_leak(tok):
    """A prompt's hidden states do not depend on what else is in the batch or on pad length."""
    model = UMT5Encoder.from_state_dict(hf_state_dict(tok.sp.get_piece_size()))
    alone = encode_text(model, tok, [ZH])[0]
    batched = encode_text(model, tok, [OFFICIAL_NEGATIVE_PROMPT, ZH])
    assert alone.shape == (len(tok.encode(ZH)), DIM)
    assert batched[0].shape[0] == len(tok.encode(OFFICIAL_NEGATIVE_PROMPT))
    scale_close(batched[1], alone, rel=1e-5)


def test_official_and_hf_layouts_agree(tok):
    vocab = tok.sp.get_piece_size()
    hf = hf_state_dict(vocab, seed=1)
    official = hf_to_official(hf)
    model = UMT5Encoder(vocab, DIM, FFN, HEADS, LAYERS, BUCKETS)
    assert set(official) == set(model.state_dict())
    assert "blocks.1.ffn.gate.0.weight" in official and "blocks.0.pos_embedding.embedding.weight" in official
    # ComfyUI-style extras and a saved-CLIP prefix are tolerated
    extras = {"spiece_model": torch.frombuffer(bytearray(b"spm"), dtype=torch.uint8)}
    prefixed = {f"text_encoders.umt5xxl.transformer.{k}": v for k, v in hf.items()}
    ids, mask = tok([EN, ZH])
    with torch.no_grad():
        outs = [UMT5Encoder.from_state_dict(sd)(ids, mask) for sd in (official, {**hf, **extras}, prefixed)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_rejects_non_umt5(tok):
    hf = hf_state_dict(tok.sp.get_piece_size())
    plain_t5 = {k: v for k, v in hf.items() if not ("relative_attention_bias" in k and ".block.0." not in k)}
    with pytest.raises(ValueError, match="umT5"):
        UMT5Encoder.from_state_dict(plain_t5)  # T5 v1.1: bias only in block 0 -> block 1 misses it
    with pytest.raises(ValueError, match="umT5"):
        UMT5Encoder.from_state_dict({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)})


def test_storage_dtypes_and_comfy_ops(tok):
    """fp16 storage: plain torch.nn makes it float32; ComfyUI's manual_cast ops keep fp16 and cast at
    use (embedding via out_dtype, norm gamma via .to(x)); scaled-fp8 weights are refused unless their scales are
    kept or folded (wan_core.checkpoint.load_text_encoder; the loader node's path is in tests/test_zoo.py)."""
    comfy = import_comfy()
    import comfy.ops

    hf16 = {k: v.half() for k, v in hf_state_dict(tok.sp.get_piece_size(), seed=2).items()}
    ids, mask = tok([EN])
    with torch.no_grad():
        plain = UMT5Encoder.from_state_dict(hf16)
        cast = UMT5Encoder.from_state_dict(hf16, ops=comfy.ops.manual_cast)
        assert plain.blocks[0].attn.q.weight.dtype == torch.float32
        assert cast.blocks[0].attn.q.weight.dtype == torch.float16
        scale_close(cast(ids, mask), plain(ids, mask), rel=1e-5)

    w = torch.randn(FFN, DIM)
    fp8 = {"blocks.0.ffn.fc1.weight": (w / 0.01).to(torch.float8_e4m3fn), "blocks.0.ffn.fc1.scale_weight": torch.tensor(0.01),
           "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    official = {**hf_to_official(hf16), **fp8}
    with pytest.raises(ValueError, match="scaled fp8"):  # never run with the scales dropped (the old silent bug)
        UMT5Encoder.from_state_dict(official)
    model = UMT5Encoder.from_state_dict(load_text_encoder(official, torch.float32).sd)
    assert torch.equal(model.blocks[0].ffn.fc1.weight, fp8["blocks.0.ffn.fc1.weight"].float() * 0.01)


# ---------------------------------------------------------------- tokenizer

def test_smoke_spm_conventions(spm, tok):
    assert train_smoke_spm() == spm  # repeatable
    sp = tok.sp
    assert 500 <= sp.get_piece_size() <= 1000
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert (sp.id_to_piece(0), sp.id_to_piece(1)) == ("<pad>", "</s>")


def test_ids_match_comfy_tokenizer(spm, tok):
    """ComfyUI's UMT5XXlTokenizer on the same spm bytes: pieces + eos, padded with 0 to at least 512.

    Conventions differ only outside this test's prompts: ComfyUI neither cleans the text nor truncates
    (longer prompts grow past 512), and it parses (weights:1.2) syntax; the official tokenizer cleans
    and truncates to 511 pieces + eos. These prompts are clean, short and parenthesis-free."""
    import_comfy()
    from comfy.text_encoders.wan import UMT5XXlTokenizer

    ref_tok = UMT5XXlTokenizer(tokenizer_data={"spiece_model": torch.ByteTensor(list(spm))})
    for text in (EN, ZH, OFFICIAL_NEGATIVE_PROMPT, "Mixed 中英文 prompt, 猫 and dog"):
        ref = [t for t, *_ in ref_tok.tokenize_with_weights(text)[0]]
        ids, mask = tok([text])
        assert ids[0].tolist() == ref
        n = int(mask.sum())
        assert ids[0, n - 1] == 1 and ids[0, n:].eq(0).all() and mask[0, :n].eq(1).all()


def test_english_and_chinese_tokens(tok):
    en, zh = tok.encode(EN), tok.encode(ZH)
    assert len(en) > 5 and len(zh) > 5 and en != zh
    for ids in (en, zh, tok.encode(OFFICIAL_NEGATIVE_PROMPT)):
        assert ids[-1] == 1 and sum(i == 2 for i in ids) == 0  # eos last, no <unk>


def test_truncation_and_batch_shape(tok):
    ids, mask = tok([EN * 200, ""])
    assert ids.shape == mask.shape == (2, 512) and ids.dtype == mask.dtype == torch.long
    assert mask[0].all() and ids[0, 511] == 1 and ids[0, 510] != 1
    assert ids[1, 0] == 1 and mask[1].sum() == 1  # empty prompt: eos only


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; b\n\t c  ") == "a & b c"
    assert clean_prompt("caf\u00c3\u00a9 &lt;3") == "café <3"  # ftfy repairs mojibake
    assert clean_prompt("猫\u3000\u3000在 跑") == "猫 在 跑"


def test_locate(spm, tmp_path):
    # 1. a `spiece_model` tensor, given as a state dict or read from a ComfyUI-style .safetensors
    tensor = torch.frombuffer(bytearray(spm), dtype=torch.uint8)
    assert UMT5Tokenizer.locate("nowhere/te.safetensors", {"spiece_model": tensor}).sp.serialized_model_proto() == spm
    st = tmp_path / "st" / "umt5_xxl_fp16.safetensors"
    st.parent.mkdir()
    save_file({"spiece_model": tensor, "shared.weight": torch.zeros(2, 2)}, str(st))
    assert UMT5Tokenizer.locate(st).sp.serialized_model_proto() == spm
    # 2. files beside the weights, 3. the official google/umt5-xxl/ and umt5-xxl/ sub-folders
    for sub, name in (("", "spiece.model"), ("", "tokenizer.model"), ("google/umt5-xxl", "spiece.model"),
                      ("umt5-xxl", "spiece.model")):
        folder = tmp_path / f"case_{sub.replace('/', '_')}_{name}"
        (folder / sub).mkdir(parents=True)
        (folder / sub / name).write_bytes(spm)
        found = UMT5Tokenizer.locate(folder / "models_t5_umt5-xxl-enc-bf16.pth")
        assert found.sp.serialized_model_proto() == spm
    # 4. nothing anywhere: a clear error naming where it looked
    with pytest.raises(FileNotFoundError) as err:
        UMT5Tokenizer.locate(tmp_path / "empty" / "models_t5_umt5-xxl-enc-bf16.pth", {})
    assert os.path.join("google", "umt5-xxl", "spiece.model") in str(err.value) and "spiece_model" in str(err.value)
