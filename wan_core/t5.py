"""umT5-XXL text encoder (encoder only) in the official Wan `.pth` key layout.

Numerics (official wan/modules/t5.py): T5 RMS LayerNorm (eps 1e-6, no mean subtraction, fp32),
attention WITHOUT the 1/sqrt(d) scale, a relative position bias of its own in every layer
(umT5: not shared; 32 bidirectional buckets, max distance 128), padding masked on the keys,
gated FFN fc2(fc1(x) * gelu_tanh(gate(x))), no biases anywhere. Activations are float32.
"""
import math
import re

import torch
import torch.nn.functional as F

from .checks import check_weights
from .keys import build_on_meta, prefix_of, strip_prefix

EPS = 1e-6
MAX_DISTANCE = 128


def _embed(embedding, ids):
    """Embedding lookup as float32; ComfyUI's casting Embedding takes `out_dtype`, torch's does not."""
    try:
        return embedding(ids, out_dtype=torch.float32)
    except TypeError:
        return embedding(ids).float()


def relative_buckets(lq, lk, num_buckets=32, max_distance=MAX_DISTANCE, device=None):
    """Bidirectional T5 bucket of (key - query) for every pair: [lq, lk] long.

    Half the buckets per direction; within a direction the first half are exact distances,
    the rest log-spaced up to max_distance (anything further shares the last bucket)."""
    rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    log_pos = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_pos * (half - exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


class T5LayerNorm(torch.nn.Module):
    """RMS norm: x * rsqrt(mean(x^2) + eps) * weight, in float32; weight cast to x at use."""

    def __init__(self, dim, eps=EPS):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x * self.weight.to(x)


class T5RelativeEmbedding(torch.nn.Module):
    """Learned per-head bias for each relative-position bucket -> [1, heads, lq, lk]."""

    def __init__(self, num_buckets, num_heads, ops=None):
        super().__init__()
        ops = ops or torch.nn
        self.num_buckets = num_buckets
        self.embedding = ops.Embedding(num_buckets, num_heads)

    def forward(self, lq, lk, device):
        buckets = relative_buckets(lq, lk, self.num_buckets, device=device)
        return _embed(self.embedding, buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(torch.nn.Module):
    """Multi-head self-attention, unscaled logits q.k + bias (bias carries the key padding mask)."""

    def __init__(self, dim, num_heads, ops=None):
        super().__init__()
        ops = ops or torch.nn
        self.num_heads = num_heads
        self.q = ops.Linear(dim, dim, bias=False)
        self.k = ops.Linear(dim, dim, bias=False)
        self.v = ops.Linear(dim, dim, bias=False)
        self.o = ops.Linear(dim, dim, bias=False)

    def forward(self, x, bias):
        b, n = x.shape[0], self.num_heads
        q, k, v = (t.view(b, -1, n, t.shape[-1] // n).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, -1, x.shape[-1]))


class T5FeedForward(torch.nn.Module):
    """Gated FFN: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim, dim_ffn, ops=None):
        super().__init__()
        ops = ops or torch.nn
        self.gate = torch.nn.Sequential(ops.Linear(dim, dim_ffn, bias=False), torch.nn.GELU(approximate="tanh"))
        self.fc1 = ops.Linear(dim, dim_ffn, bias=False)
        self.fc2 = ops.Linear(dim_ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(torch.nn.Module):
    """Pre-norm encoder block with its own relative position bias (umT5)."""

    def __init__(self, dim, dim_ffn, num_heads, num_buckets, ops=None):
        super().__init__()
        self.norm1 = T5LayerNorm(dim)
        self.attn = T5Attention(dim, num_heads, ops)
        self.norm2 = T5LayerNorm(dim)
        self.ffn = T5FeedForward(dim, dim_ffn, ops)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads, ops)

    def forward(self, x, key_pad):
        """x [B,L,C] float32; key_pad [B,1,1,L] bool, True where the key is padding."""
        bias = self.pos_embedding(x.shape[1], x.shape[1], x.device)
        bias = torch.where(key_pad, torch.finfo(x.dtype).min, bias)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(torch.nn.Module):
    """umT5 encoder: token embedding -> blocks -> final RMS norm; float32 hidden states."""

    def __init__(self, vocab=256384, dim=4096, dim_ffn=10240, num_heads=64, num_layers=24, num_buckets=32, ops=None):
        super().__init__()
        ops = ops or torch.nn
        self.dim = dim
        self.token_embedding = ops.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(
            [T5Block(dim, dim_ffn, num_heads, num_buckets, ops) for _ in range(num_layers)])
        self.norm = T5LayerNorm(dim)

    def forward(self, ids, mask):
        """ids, mask [B,L] (mask 1 = real token, 0 = padding) -> [B,L,dim] float32."""
        x = _embed(self.token_embedding, ids)
        key_pad = (mask == 0).view(mask.shape[0], 1, 1, -1).to(x.device)
        for block in self.blocks:
            x = block(x, key_pad)
        return self.norm(x)

    @classmethod
    def from_state_dict(cls, sd, ops=None):
        """Build from an official or HF/ComfyUI-layout state dict; the config comes from shapes.

        Weights are assigned without copies in their stored dtype when `ops` is given (ComfyUI casts at use);
        with plain torch.nn (ops=None) they are made float32. A quantized file's per-layer scales need layers
        that hold them (the quantized ops of nodes/ops.py and wan_core/castops.py) or decoding first:
        wan_core.checkpoint.load_text_encoder does either; scales this model cannot take are refused, never dropped."""
        sd = to_official(sd)
        config = infer_config(sd)
        if ops is None:
            sd = {k: v.float() for k, v in sd.items()}
        model, expected = build_on_meta(lambda o: cls(**config, ops=o), ops)
        check_weights(expected, sd, "umT5 text encoder weights")
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in missing if k.endswith(".weight")]
        if missing:
            raise ValueError(f"not a umT5 encoder state dict: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            scaled = any(k.endswith(_SCALE_KEYS) or k == "scaled_fp8" for k in unexpected)
            raise ValueError(f"umT5 weights this encoder cannot use: {unexpected[:3]}"
                             + (" (quantized, e.g. scaled fp8: load the file with wan_core.checkpoint.load_text_encoder, which keeps "
                                "the scales for the quantized ops or decodes the weights)" if scaled else ""))
        return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- state dict layouts

_HF_BLOCK = {
    "layer.0.layer_norm": "norm1",
    "layer.0.SelfAttention.q": "attn.q",
    "layer.0.SelfAttention.k": "attn.k",
    "layer.0.SelfAttention.v": "attn.v",
    "layer.0.SelfAttention.o": "attn.o",
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "layer.1.layer_norm": "norm2",
    "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
    "layer.1.DenseReluDense.wi_1": "ffn.fc1",
    "layer.1.DenseReluDense.wo": "ffn.fc2",
}
_HF_TOP = {"shared": "token_embedding", "encoder.embed_tokens": "token_embedding", "encoder.final_layer_norm": "norm"}
_HF_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.(.+)\.([^.]+)$")
_SKIP = ("decoder.", "lm_head.")
_NON_WEIGHTS = ("spiece_model",)  # the tokenizer ComfyUI embeds in its umt5_xxl files
_SCALE_KEYS = (".scale_weight", ".scale_input")


def _hf_key(key):
    """Official name for one HF key, or None when it is not an encoder weight we know."""
    m = _HF_BLOCK_KEY.match(key)
    if m and m.group(2) in _HF_BLOCK:
        return f"blocks.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.{m.group(3)}"
    module, _, leaf = key.rpartition(".")
    return f"{_HF_TOP[module]}.{leaf}" if module in _HF_TOP else None


def hf_to_official(sd):
    """HF / ComfyUI (`umt5_xxl_*.safetensors`) keys -> official keys. Tensors are not copied.

    Per-layer extras (`.scale_weight`, `.scale_input` of scaled fp8 files) follow their layer, the `scaled_fp8`
    marker is kept (wan_core.checkpoint.load_text_encoder reads it); decoder / lm_head weights and the
    `spiece_model` tokenizer are dropped."""
    out = {}
    for key, value in sd.items():
        if key in _NON_WEIGHTS or key.startswith(_SKIP):
            continue
        new = _hf_key(key)
        if new is None:
            out.setdefault(key, value)
        elif not (key.startswith("encoder.embed_tokens.") and new in out):
            out[new] = value  # `shared` wins over its tied copy encoder.embed_tokens
    return out


def to_official(sd):
    """Any supported layout -> official keys (official dicts pass through, prefix stripped)."""
    if any(k.endswith("blocks.0.norm1.weight") for k in sd):
        sd = strip_prefix(sd, prefix_of(sd, "blocks.0.norm1.weight"))
        return {k: v for k, v in sd.items() if k not in _NON_WEIGHTS}
    if any(k.endswith("encoder.final_layer_norm.weight") for k in sd):
        return hf_to_official(strip_prefix(sd, prefix_of(sd, "encoder.final_layer_norm.weight")))
    raise ValueError("not a umT5 encoder state dict: no `blocks.0.norm1.weight` (official) "
                     "or `encoder.final_layer_norm.weight` (HF) key")


def infer_config(sd):
    """UMT5Encoder kwargs from official-layout shapes."""
    need = ("token_embedding.weight", "blocks.0.pos_embedding.embedding.weight", "blocks.0.ffn.fc1.weight",
            "blocks.0.attn.q.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise ValueError(f"not a umT5 encoder state dict: missing {absent} "
                         "(plain T5 shares one position bias; umT5 has one per layer)")
    vocab, dim = sd["token_embedding.weight"].shape
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    if tuple(sd["blocks.0.attn.q.weight"].shape) != (dim, dim):
        raise ValueError(f"umT5 attention width must equal dim {dim}, got {tuple(sd['blocks.0.attn.q.weight'].shape)}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.norm1\.weight$", k))}
    return dict(vocab=vocab, dim=dim, dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0], num_heads=num_heads,
                num_layers=max(layers) + 1, num_buckets=num_buckets)


@torch.no_grad()
def encode_text(encoder, tokenizer, prompts, device=None):
    """Tokenize + encode; one [L_i, dim] float32 tensor per prompt, trimmed to its real length
    (tokens + eos), as the official T5EncoderModel returns them."""
    ids, mask = tokenizer(list(prompts))
    if device is None:
        device = next(encoder.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    context = encoder(ids, mask)
    return [c[:n] for c, n in zip(context, mask.gt(0).sum(dim=1).tolist())]
