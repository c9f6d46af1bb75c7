"""umT5 (google/umt5-xxl) SentencePiece tokenizer with the official Wan prompt cleaning.

Official behaviour (HuggingfaceTokenizer(clean='whitespace'), add_special_tokens, padding
'max_length', truncation): text -> ftfy.fix_text -> html.unescape twice -> whitespace runs to one
space -> strip; SentencePiece ids, cut to max_len - 1, then eos (</s>, id 1); padded with 0.
"""
import html
import os
import re

import torch

OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# per-model defaults of the official configs: Wan 2.1 I2V-14B prefixes "camera shake", FLF2V-14B (a copy of the
# I2V config) prefixes "shot change" to that; Wan 2.2 S2V-14B has its own; every other model uses the shared one
I2V_NEGATIVE_PROMPT = "镜头晃动，" + OFFICIAL_NEGATIVE_PROMPT
FLF2V_NEGATIVE_PROMPT = "镜头切换，" + I2V_NEGATIVE_PROMPT
S2V_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
    "背景人很多，倒着走"
)
TOKENIZER_FILES = ("spiece.model", "tokenizer.model")
TOKENIZER_DIRS = ("", os.path.join("google", "umt5-xxl"), "umt5-xxl")


def clean_prompt(text):
    """Official 'whitespace' cleaning: ftfy fix, HTML unescape twice, collapse whitespace, strip."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """SentencePiece ids with eos appended, padded/truncated to `max_len`; returns (ids, mask)."""

    def __init__(self, model_proto, max_len=512):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=bytes(model_proto))
        self.max_len = max_len
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 1
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    @classmethod
    def locate(cls, checkpoint_path, state_dict=None):
        """Tokenizer for a text-encoder checkpoint: its `spiece_model` tensor (ComfyUI files) first,
        else spiece.model / tokenizer.model beside it, or in google/umt5-xxl/ or umt5-xxl/ beside it."""
        proto = _proto_from_state_dict(state_dict) if state_dict is not None else _proto_from_safetensors(checkpoint_path)
        if proto is not None:
            return cls(proto)
        tried = candidate_files(checkpoint_path)
        for path in tried:
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    return cls(f.read())
        raise FileNotFoundError(
            f"umT5 tokenizer not found for {checkpoint_path!r}: no `spiece_model` tensor in the checkpoint "
            f"and none of these files exists: {', '.join(tried)}")

    def encode(self, text):
        """Cleaned text -> ids (no padding): pieces cut to max_len - 1, then eos."""
        return self.sp.encode(clean_prompt(text))[: self.max_len - 1] + [self.eos_id]

    def __call__(self, prompts):
        """list[str] -> ids [B, max_len] long (pad 0), mask [B, max_len] long (1 = token or eos)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.max_len), dtype=torch.long)
        for row, text in enumerate(prompts):
            tokens = self.encode(text)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask


def _proto_from_state_dict(sd):
    """Bytes of a ComfyUI-style `spiece_model` uint8 tensor, or None."""
    t = sd.get("spiece_model") if hasattr(sd, "get") else None
    return None if t is None else t.cpu().numpy().tobytes()


def _proto_from_safetensors(path):
    """`spiece_model` read straight from a .safetensors file (only that tensor), or None."""
    if not (str(path).endswith(".safetensors") and os.path.isfile(path)):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor("spiece_model").numpy().tobytes() if "spiece_model" in f.keys() else None


def candidate_files(checkpoint_path):
    """Where a tokenizer file may lie: the checkpoint's folder (or the folder itself) and its
    google/umt5-xxl/ and umt5-xxl/ sub-folders (the official release layout)."""
    path = str(checkpoint_path)
    if path.endswith(".model"):
        return [path]
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return [os.path.join(folder, sub, name) for sub in TOKENIZER_DIRS for name in TOKENIZER_FILES]
