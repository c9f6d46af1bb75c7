"""The wav2vec 2.0 speech encoder of Wan2.2-S2V (wav2vec2-large-xlsr-53-english), returning every hidden state.

Architecture (HF Wav2Vec2Model with feat_extract_norm="layer", do_stable_layer_norm=True):
- feature encoder: 7 Conv1d (kernel/stride 10/5, then 3/2 x4, then 2/2 x2; 512 channels, with bias), each
  followed by a LayerNorm over channels and exact GELU: 16 kHz samples -> frames every 320 samples (50 Hz),
  400-sample receptive field, so N samples give `conv_output_length(N)` frames (16000 -> 49);
- feature projection: LayerNorm(512) -> Linear(512, 1024);
- positional embedding: Conv1d(1024, 1024, kernel 128, padding 64, groups 16) with weight norm over the
  kernel axis (dim 2), last output frame dropped (even kernel), GELU, added to its input;
- 24 pre-LN ("stable layer norm") layers: x += attn(LN(x)) (16 heads, scale 1/sqrt(64)),
  x += Linear-GELU-Linear(LN(x)) (4096 wide); a final LayerNorm. All LayerNorm eps 1e-5.
Hidden states, as HF `output_hidden_states` gives them for this variant and as the official
`AudioEncoder.extract_audio_feat(return_all_layers=True)` concatenates them: [the positional-conv output added to
the projection (the input of layer 0), the outputs of layers 0..22, LayerNorm(output of layer 23)], 25 in all. (That is
transformers<=4.51.3, which the official code pins; transformers 5 puts the raw output of layer 23 last.)
Inference only: no dropout, no SpecAugment masking (`masked_spec_embed` is not used).

The input is the prepared waveform (audio.prepare: mono, 16 kHz, zero mean / unit variance); the official code
(Wav2Vec2Processor, do_normalize) and ComfyUI (inside its model) normalise the same way before the convolutions.

Keys are the HF ones: `feature_extractor.conv_layers.N.{conv,layer_norm}`, `feature_projection.{layer_norm,
projection}`, `encoder.pos_conv_embed.conv.{weight_g,weight_v,bias}`, `encoder.layers.N.{attention.{q,k,v,out}_proj,
layer_norm, feed_forward.{intermediate,output}_dense, final_layer_norm}`, `encoder.layer_norm`. Files may carry any
prefix (`wav2vec2.` in Wav2Vec2ForCTC files; ComfyUI's wav2vec2_large_english_fp16.safetensors has none) and the
weight norm either as `weight_g`/`weight_v` (hub checkpoints) or as torch parametrizations
(`parametrizations.weight.original0`/`original1`, what ComfyUI's and newer transformers' models save).
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import ProjectedAttention
from .keys import assign_weights, describe, prefix_of, strip_prefix
from .clip import _norm as norm_f32

CONV_LAYERS = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2  # (kernel, stride) of the feature encoder
MIN_SAMPLES = 400  # receptive field of one feature frame (25 ms at 16 kHz)
HEAD_DIM = 64  # every released wav2vec2 model uses 64-wide heads; heads = width // 64 unless given
EPS = 1e-5
MARKER = "feature_projection.projection.weight"
FILES = ("expected the wav2vec2-large-xlsr-53-english audio encoder: ComfyUI's wav2vec2_large_english_fp16.safetensors "
         "(models/audio_encoders) or the HF model folder's model.safetensors / pytorch_model.bin")


def conv_output_length(num_samples):
    """Frames the feature encoder makes from num_samples 16 kHz samples (0 when shorter than 400 samples)."""
    n = num_samples
    for kernel, stride in CONV_LAYERS:
        n = (n - kernel) // stride + 1 if n >= kernel else 0
    return n


class ConvLayer(nn.Module):
    """Conv1d -> LayerNorm over channels -> GELU, on [B, C, T]."""

    def __init__(self, cin, cout, kernel, stride, bias, ops):
        super().__init__()
        self.conv = ops.Conv1d(cin, cout, kernel, stride=stride, bias=bias)
        self.layer_norm = ops.LayerNorm(cout, eps=EPS)

    def forward(self, x):
        return F.gelu(norm_f32(self.layer_norm, self.conv(x).transpose(1, 2))).transpose(1, 2)


class FeatureProjection(nn.Module):
    def __init__(self, conv_dim, dim, ops):
        super().__init__()
        self.layer_norm = ops.LayerNorm(conv_dim, eps=EPS)
        self.projection = ops.Linear(conv_dim, dim)

    def forward(self, x):
        return self.projection(norm_f32(self.layer_norm, x))


class WeightNormConv1d(nn.Module):
    """Grouped 'same' Conv1d whose weight is weight_g * weight_v / ||weight_v|| (norm over all but the kernel axis)."""

    def __init__(self, dim, kernel, groups):
        super().__init__()
        self.groups = groups
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(dim, dim // groups, kernel))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        v = self.weight_v.float()
        weight = v * (self.weight_g.float() / v.norm(dim=(0, 1), keepdim=True))
        kernel = weight.shape[-1]
        y = F.conv1d(x, weight.to(x), self.bias.to(x), padding=kernel // 2, groups=self.groups)
        return y[..., :-1] if kernel % 2 == 0 else y


class PositionalConvEmbedding(nn.Module):
    def __init__(self, dim, kernel, groups):
        super().__init__()
        self.conv = WeightNormConv1d(dim, kernel, groups)

    def forward(self, x):
        return F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)


Attention = ProjectedAttention  # q_proj/k_proj/v_proj/out_proj, shared with the CLIP tower


class FeedForward(nn.Module):
    def __init__(self, dim, ffn_dim, ops):
        super().__init__()
        self.intermediate_dense = ops.Linear(dim, ffn_dim)
        self.output_dense = ops.Linear(ffn_dim, dim)

    def forward(self, x):
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, dim, ffn_dim, heads, ops):
        super().__init__()
        self.attention = Attention(dim, heads, ops)
        self.layer_norm = ops.LayerNorm(dim, eps=EPS)
        self.feed_forward = FeedForward(dim, ffn_dim, ops)
        self.final_layer_norm = ops.LayerNorm(dim, eps=EPS)

    def forward(self, x):
        x = x + self.attention(norm_f32(self.layer_norm, x))
        return x + self.feed_forward(norm_f32(self.final_layer_norm, x))


class Encoder(nn.Module):
    def __init__(self, dim, ffn_dim, heads, num_layers, pos_kernel, pos_groups, ops):
        super().__init__()
        self.pos_conv_embed = PositionalConvEmbedding(dim, pos_kernel, pos_groups)
        self.layers = nn.ModuleList(EncoderLayer(dim, ffn_dim, heads, ops) for _ in range(num_layers))
        self.layer_norm = ops.LayerNorm(dim, eps=EPS)

    def forward(self, x):
        x = x + self.pos_conv_embed(x)
        states = []
        for layer in self.layers:
            states.append(x)
            x = layer(x)
        states.append(norm_f32(self.layer_norm, x))
        return torch.stack(states, dim=1)


class Wav2Vec2(nn.Module):
    """wav2vec2 (layer-norm conv features, stable-layer-norm transformer) -> hidden states [B, layers+1, T, dim]."""

    def __init__(self, conv_dim=512, dim=1024, ffn_dim=4096, num_layers=24, heads=None, pos_kernel=128,
                 pos_groups=16, conv_bias=True, ops=None):
        super().__init__()
        ops = ops or nn
        heads = heads or max(1, dim // HEAD_DIM)
        if dim % heads or dim % pos_groups:
            raise ValueError(f"wav2vec2 width {dim} must be divisible by heads={heads} and pos_groups={pos_groups}")
        layers, cin = [], 1
        for kernel, stride in CONV_LAYERS:
            layers.append(ConvLayer(cin, conv_dim, kernel, stride, conv_bias, ops))
            cin = conv_dim
        self.feature_extractor = nn.ModuleDict({"conv_layers": nn.ModuleList(layers)})
        self.feature_projection = FeatureProjection(conv_dim, dim, ops)
        self.encoder = Encoder(dim, ffn_dim, heads, num_layers, pos_kernel, pos_groups, ops)

    def forward(self, wave):
        """Prepared 16 kHz waveform [B, N] (or [N]) -> hidden states [B, num_layers + 1, conv_output_length(N), dim]."""
        if wave.ndim == 1:
            wave = wave[None]
        if wave.ndim != 2:
            raise ValueError(f"wav2vec2 takes a mono 16 kHz waveform [batch, samples], got shape {tuple(wave.shape)}: "
                             "run audio.prepare() on the audio first")
        if wave.shape[-1] < MIN_SAMPLES:
            raise ValueError(f"audio of {wave.shape[-1]} samples is too short for wav2vec2: it needs at least "
                             f"{MIN_SAMPLES} samples at 16 kHz (25 ms)")
        x = wave[:, None]
        for layer in self.feature_extractor["conv_layers"]:
            x = layer(x)
        return self.encoder(self.feature_projection(x.transpose(1, 2)))

    @classmethod
    def from_state_dict(cls, sd, ops=None, heads=None):
        """Build from an HF-layout state dict (any prefix, either weight-norm layout); sizes come from shapes,
        heads from width // 64 unless given. With `ops` tensors are assigned as stored (ComfyUI casts at use);
        with plain torch.nn (ops=None) they are made float32."""
        sd = to_internal(sd)
        config = infer_config(sd)
        return assign_weights(lambda o: cls(**config, heads=heads, ops=o), sd, ops, "wav2vec2", FILES)


# ---------------------------------------------------------------- state dict layouts

_PARAMETRIZED = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")


def to_internal(sd):
    """HF-layout keys without their prefix (`wav2vec2.`, ...), weight norm as weight_g/weight_v; other keys
    (lm_head, masked_spec_embed, quantizer, ...) dropped."""
    prefix = prefix_of(sd, MARKER)
    if prefix is None:
        raise ValueError(f"not a wav2vec2 audio encoder: it looks like {describe(sd)}; {FILES}")
    out = {}
    for key, value in strip_prefix(sd, prefix).items():
        for old, new in _PARAMETRIZED.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def infer_config(sd):
    """Wav2Vec2 kwargs (all but heads) from internal-layout shapes."""
    if "feature_extractor.conv_layers.1.layer_norm.weight" not in sd:
        raise ValueError("this wav2vec2 has a group-norm feature encoder (a wav2vec2-base / -960h style model), which "
                         f"Wan S2V does not use; {FILES}")
    kernels = tuple(sd[f"feature_extractor.conv_layers.{i}.conv.weight"].shape[-1]
                    for i in range(len(CONV_LAYERS)) if f"feature_extractor.conv_layers.{i}.conv.weight" in sd)
    if kernels != tuple(k for k, _ in CONV_LAYERS):
        raise ValueError(f"unsupported wav2vec2 feature encoder (conv kernels {kernels}); {FILES}")
    weight_v = sd.get("encoder.pos_conv_embed.conv.weight_v")
    if weight_v is None or "encoder.layers.0.feed_forward.intermediate_dense.weight" not in sd:
        raise ValueError(f"incomplete wav2vec2 state dict (no positional conv or encoder layers); {FILES}")
    dim = sd[MARKER].shape[0]
    return dict(conv_dim=sd[MARKER].shape[1], dim=dim,
                ffn_dim=sd["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
                num_layers=1 + max(int(m.group(1)) for m in map(_LAYER_KEY.match, sd) if m),
                pos_kernel=weight_v.shape[-1], pos_groups=dim // weight_v.shape[1],
                conv_bias="feature_extractor.conv_layers.1.conv.bias" in sd)
