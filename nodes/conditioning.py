"""Text encoding: prompt and negative prompt through umT5 into native CONDITIONING."""
import torch

from comfy_api.latest import io

from ..wan_core.checks import ENCODER_CAUSE, check_finite
from ..wan_core.pipeline import pad_context
from ..wan_core.t5 import encode_text
from ..wan_core.tokenizer import OFFICIAL_NEGATIVE_PROMPT
from .common import WanLeanNode, WanLeanTextEncoder

EXAMPLE_PROMPT = ("Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely "
                  "on a spotlighted stage.")


def text_memory(handle, batch):
    """Peak of encoding `batch` prompts of 512 tokens: one dim x ffn weight cast to the compute dtype, the position
    bias for all heads (shared, plus one masked copy per prompt) and the gated FFN's four ffn-wide temporaries.
    umT5-XXL in fp32: 368 MiB for 1 prompt, 512 MiB for 2 (one block measured: 351 and 425 MiB, CPU, RSS)."""
    block = handle.patcher.model.blocks[0]
    ffn, heads = block.ffn.fc1.out_features, block.attn.num_heads
    values = handle.patcher.model.dim * ffn + (batch + 1) * heads * 512 ** 2 + batch * 512 * 4 * ffn
    return values * torch.finfo(handle.dtype).bits // 8


def encode_prompts(text_encoder, prompts):
    """Prompts -> their umT5 features, one [L_i, dim] float32 CPU tensor each (trimmed to the real length)."""
    model = text_encoder.load(text_memory(text_encoder, len(prompts)))
    with torch.no_grad():
        feats = encode_text(model, text_encoder.extra["tokenizer"], list(prompts), device=text_encoder.device)
    for i, features in enumerate(feats):
        check_finite(features, f"the umT5 features of prompt {i + 1} (of {len(feats)})", ENCODER_CAUSE)
    return [f.float().cpu() for f in feats]


class WanLeanTextEncode(WanLeanNode):
    @classmethod
    def define_schema(cls):
        return cls.schema("WanLeanTextEncode", "Wan Text Encode", (
            "Encodes a prompt and a negative prompt with umT5 (prompts cleaned and padded to 512 tokens as the "
            "official release does). English and Chinese both work."), [
            WanLeanTextEncoder.Input("text_encoder", tooltip="From Wan Load Text Encoder."),
            io.String.Input("prompt", multiline=True, default=EXAMPLE_PROMPT, tooltip="What the video shows."),
            io.String.Input("negative_prompt", multiline=True, default=OFFICIAL_NEGATIVE_PROMPT,
                            tooltip="What to steer away from; the default is the official Wan negative prompt."),
        ], [io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")])

    @classmethod
    def execute(cls, text_encoder, prompt, negative_prompt):
        pos, neg = encode_prompts(text_encoder, [prompt, negative_prompt])
        return io.NodeOutput([[pad_context(pos), {}]], [[pad_context(neg), {}]])


NODES = [WanLeanTextEncode]
