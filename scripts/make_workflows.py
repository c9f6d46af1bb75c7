"""Writes the UI-format workflows in workflows/ from the compact graph recipes below, each with its template-browser
thumbnail beside it (same stem, .jpg: what ComfyUI's frontend asks a custom node's template for)
(run it after changing a node's widgets: `python scripts/make_workflows.py`).

A recipe adds nodes to a Graph: `g.add(type, widgets, title=None, **inputs)` where inputs map an input
name to `(node, output_name)`; slots and link ids are filled in, nodes laid out left to right. `g.card` collects
what the thumbnail says (title, size, frames, fps); the inputs it shows are read from the graph's nodes.
"""
import functools
import io
import json
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from example_inputs import NAMES as EXAMPLE_IMAGES, draw, pose_frame  # noqa: E402
from wan_core.tokenizer import (FLF2V_NEGATIVE_PROMPT, I2V_NEGATIVE_PROMPT, OFFICIAL_NEGATIVE_PROMPT,  # noqa: E402
                                S2V_NEGATIVE_PROMPT)

# (inputs, outputs) of each node type used, as (name, type) in slot order
SLOTS = {
    "WanLeanModelLoader": ([], [("model", "WANLEAN_MODEL")]),
    "WanLeanVAELoader": ([], [("vae", "WANLEAN_VAE")]),
    "WanLeanTextEncoderLoader": ([], [("text_encoder", "WANLEAN_TEXT_ENCODER")]),
    "WanLeanCLIPVisionLoader": ([], [("clip_vision", "WANLEAN_CLIP_VISION")]),
    "WanLeanTextEncode": ([("text_encoder", "WANLEAN_TEXT_ENCODER")], [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "WanLeanCLIPVisionEncode": ([("clip_vision", "WANLEAN_CLIP_VISION"), ("image", "IMAGE")],
                                [("clip_vision_output", "CLIP_VISION_OUTPUT")]),
    "WanLeanImageToVideo": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "WANLEAN_VAE"),
                             ("start_image", "IMAGE"), ("end_image", "IMAGE"), ("clip_vision_start", "CLIP_VISION_OUTPUT"),
                             ("clip_vision_end", "CLIP_VISION_OUTPUT")],
                            [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("width", "INT"), ("height", "INT")]),
    "WanLeanSampler": ([("model", "WANLEAN_MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                       [("latent", "LATENT")]),
    "WanLeanSamplerA14B": ([("high_noise_model", "WANLEAN_MODEL"), ("low_noise_model", "WANLEAN_MODEL"),
                            ("positive", "CONDITIONING"), ("negative", "CONDITIONING")], [("latent", "LATENT")]),
    "WanLeanVAEDecode": ([("vae", "WANLEAN_VAE"), ("latent", "LATENT")], [("frames", "IMAGE")]),
    "WanLeanSaveVideo": ([("frames", "IMAGE"), ("audio", "AUDIO")], []),
    "WanLeanAudioEncoderLoader": ([], [("audio_encoder", "WANLEAN_AUDIO_ENCODER")]),
    "WanLeanLoadAudio": ([], [("audio", "AUDIO")]),
    "WanLeanSpeechToVideo": ([("model", "WANLEAN_MODEL"), ("vae", "WANLEAN_VAE"), ("audio_encoder", "WANLEAN_AUDIO_ENCODER"),
                              ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("ref_image", "IMAGE"),
                              ("audio", "AUDIO"), ("pose_video", "IMAGE")], [("frames", "IMAGE"), ("audio", "AUDIO")]),
    "WanLeanLoraLoader": ([("model", "WANLEAN_MODEL")], [("model", "WANLEAN_MODEL")]),
    "WanLeanLongVideo": ([("model", "WANLEAN_MODEL"), ("vae", "WANLEAN_VAE"), ("positive", "CONDITIONING"),
                          ("negative", "CONDITIONING"), ("start_image", "IMAGE"), ("end_image", "IMAGE"),
                          ("clip_vision_start", "CLIP_VISION_OUTPUT"), ("clip_vision_end", "CLIP_VISION_OUTPUT"),
                          ("low_noise_model", "WANLEAN_MODEL"), ("text_encoder", "WANLEAN_TEXT_ENCODER")],
                         [("frames", "IMAGE")]),
    "LoadVideo": ([], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ([("video", "VIDEO")], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "MarkdownNote": ([], []),
}
# room each node needs on the canvas (the frontend grows nodes to fit widgets and image previews)
HEIGHTS = {"WanLeanSpeechToVideo": 480, "WanLeanLongVideo": 720, "LoadVideo": 420, "WanLeanSampler": 400, "WanLeanSamplerA14B": 480, "LoadImage": 420, "WanLeanTextEncode": 320,
           "WanLeanImageToVideo": 260, "MarkdownNote": 300, "WanLeanSaveVideo": 360}
PER_COLUMN = 3
PROMPT = "A cat walks on the grass, realistic style, soft sunlight, the camera slowly follows it."
I2V_PROMPT = "The sun slowly moves across the sky above a small red house on a green hill, gentle clouds drift by."


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []
        self.column_y = {}
        self.card = {}

    def place(self, ntype):
        """Left to right, PER_COLUMN nodes a column, each below the previous one's room."""
        col = len(self.nodes) // PER_COLUMN
        y = self.column_y.get(col, 60)
        self.column_y[col] = y + HEIGHTS.get(ntype, 160) + 40
        return [40 + 380 * col, y]

    def add(self, ntype, widgets, title=None, **inputs):
        nid = len(self.nodes) + 1
        ins, outs = SLOTS[ntype]
        node = {"id": nid, "type": ntype, "pos": self.place(ntype), "size": [340, HEIGHTS.get(ntype, 160)], "flags": {}, "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in ins],
                "outputs": [{"name": n, "type": t, "links": []} for n, t in outs],
                "properties": {"Node name for S&R": ntype}, "widgets_values": widgets}
        if title:
            node["title"] = title
        for name, (src, out_name) in inputs.items():
            slot = [n for n, _ in ins].index(name)
            src_slot = [o["name"] for o in src["outputs"]].index(out_name)
            link = [len(self.links) + 1, src["id"], src_slot, nid, slot, ins[slot][1]]
            self.links.append(link)
            node["inputs"][slot]["link"] = link[0]
            src["outputs"][src_slot]["links"].append(link[0])
        self.nodes.append(node)
        return node

    def workflow(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def note(title, files, defaults):
    lines = "\n".join(f"- `models/{f}`" for f in files)
    return f"**{title}**\n\nPut the model files here (ComfyUI's repackaged names; the official files work too):\n{lines}\n\n{defaults}"


def text_side(g, prompt, negative=OFFICIAL_NEGATIVE_PROMPT):
    """umT5 loader + Wan Text Encode with the model's official default negative prompt."""
    te = g.add("WanLeanTextEncoderLoader", ["umt5_xxl_fp16.safetensors"])
    return g.add("WanLeanTextEncode", [prompt, negative], text_encoder=(te, "text_encoder"))


def sampler(g, ntype, head, size, tail=(0.0, 0, "comfy"), **links):
    """A sampler node with the widgets head + (width, height, length) + tail; the size also goes on the thumbnail."""
    g.card["size"] = size
    return g.add(ntype, [*head, *size, *tail], **links)


def finish(g, vae, latent, fps, prefix):
    frames = g.add("WanLeanVAEDecode", ["auto"], vae=(vae, "vae"), latent=(latent, "latent"))
    g.add("WanLeanSaveVideo", [fps, prefix, 19], frames=(frames, "frames"))
    g.card["fps"] = fps
    return g


TE, VAE21, VAE22 = "text_encoders/umt5_xxl_fp16.safetensors", "vae/wan_2.1_vae.safetensors", "vae/wan2.2_vae.safetensors"


def start_graph(title, files, defaults):
    g = Graph()
    g.card["title"] = title
    g.add("MarkdownNote", [note(title, files, defaults)], title="Model files")
    return g


def model_loader(g, model_file, loras=(), title=None):
    """Wan Load Diffusion Model, followed by a Wan Load LoRA per entry of `loras`: (file, strength, label)."""
    model = g.add("WanLeanModelLoader", [model_file, "default", "auto", "off"], title=title)
    for file, strength, label in loras:
        model = g.add("WanLeanLoraLoader", [file, strength], title=title and f"{title}: {label}", model=(model, "model"))
    return model


# The step-distillation LoRAs (published names as ComfyUI's templates use them) and their solver settings: 4 steps,
# cfg 1 (no negative pass), shift 5, the distilled schedule (wan_core.sampling: exact training timesteps).
LIGHTNING = {"t2v": "wan2.2_t2v_lightx2v_4steps_lora_v1.1_{}_noise.safetensors",
             "i2v": "wan2.2_i2v_lightx2v_4steps_lora_v1_{}_noise.safetensors"}
LIGHTNING_SOURCE = {"t2v": "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1", "i2v": "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1"}
LIGHTX2V = {"t2v": "lightx2v_T2V_14B_cfg_step_distill_v2_lora_rank64_bf16.safetensors",
            "i2v": "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"}
LIGHTX2V_NOTE = ("4-step preset with the lightx2v step/CFG-distillation LoRA (strength 1; Kijai's extraction of "
                 "lightx2v's Wan2.1-{}-StepDistill-CfgDistill model, the name ComfyUI's templates use): 4 steps, cfg 1 "
                 "(no negative pass), shift 5, lcm-distilled (lightx2v's own Wan 2.1 step: fresh noise each step, "
                 "timesteps 1000/937.5/833.3/625); euler-distilled also works. 81 frames at 16 fps.")
LIGHTX2V_SAMPLER = [0, "fixed", 4, 1.0, 5.0, "lcm-distilled"]  # seed, control, steps, cfg, shift, sampler


def t2v(model_file, width, height, title, lora=None):
    g = start_graph(title, [f"diffusion_models/{model_file}", TE, VAE21] + ([f"loras/{lora}"] if lora else []),
                    LIGHTX2V_NOTE.format("T2V-14B") if lora else
                    "Official defaults: 50 UniPC steps, shift 5, guidance 5, 81 frames at 16 fps.")
    model = model_loader(g, model_file, [(lora, 1.0, "step-distillation LoRA")] if lora else ())
    enc, vae = text_side(g, PROMPT), g.add("WanLeanVAELoader", ["wan_2.1_vae.safetensors"])
    head = LIGHTX2V_SAMPLER if lora else [0, "fixed", 50, 5.0, 5.0, "unipc"]
    s = sampler(g, "WanLeanSampler", head, (width, height, 81),
                model=(model, "model"), positive=(enc, "positive"), negative=(enc, "negative"))
    return finish(g, vae, s, 16, "wan/t2v")


def images(g, clip, names):
    """LoadImage nodes (+ their CLIP encodings when clip) for the start (and end) image."""
    out = []
    for name, title in zip(names, ("Start image", "End image")):
        img = g.add("LoadImage", [name, "image"], title=title)
        enc = g.add("WanLeanCLIPVisionEncode", [], clip_vision=(clip, "clip_vision"), image=(img, "IMAGE")) if clip else None
        out.append((img, enc))
    return out


def image_cond(g, enc, vae, imgs, size):
    (start, cs), *end = imgs
    links = dict(positive=(enc, "positive"), negative=(enc, "negative"), vae=(vae, "vae"), start_image=(start, "IMAGE"))
    if cs:
        links["clip_vision_start"] = (cs, "clip_vision_output")
    if end:
        links.update(end_image=(end[0][0], "IMAGE"), clip_vision_end=(end[0][1], "clip_vision_output"))
    return g.add("WanLeanImageToVideo", [*size, "crop"], **links)


def i2v_21(model_file, width, height, steps, shift, title, flf=False, lora=None):
    files = [f"diffusion_models/{model_file}", TE, VAE21, "clip_vision/clip_vision_h.safetensors"]
    g = start_graph(title, files + ([f"loras/{lora}"] if lora else []),
                    LIGHTX2V_NOTE.format("I2V-14B-480P") if lora else
                    f"Official defaults: {steps} UniPC steps, shift {shift}, guidance 5, 81 frames at 16 fps.")
    model = model_loader(g, model_file, [(lora, 1.0, "step-distillation LoRA")] if lora else ())
    enc = text_side(g, I2V_PROMPT, FLF2V_NEGATIVE_PROMPT if flf else I2V_NEGATIVE_PROMPT)
    vae = g.add("WanLeanVAELoader", ["wan_2.1_vae.safetensors"])
    clip = g.add("WanLeanCLIPVisionLoader", ["clip_vision_h.safetensors"])
    names = ("wan_example_start.png", "wan_example_end.png") if flf else ("wan_example_start.png",)
    cond = image_cond(g, enc, vae, images(g, clip, names), (width, height, 81))
    head = LIGHTX2V_SAMPLER if lora else [0, "fixed", steps, 5.0, shift, "unipc"]
    s = sampler(g, "WanLeanSampler", head, (width, height, 81),
                model=(model, "model"), positive=(cond, "positive"), negative=(cond, "negative"))
    return finish(g, vae, s, 16, "wan/flf2v" if flf else "wan/i2v")


def a14b_note(kind, cfgs, shift, boundary, distilled):
    if not distilled:
        return (f"Official defaults: 40 UniPC steps, shift {shift}, guidance {cfgs[0]} (high noise) / {cfgs[1]} (low noise), "
                f"expert switch at timestep {boundary}x1000, 81 frames at 16 fps, 1280x720. No CLIP.")
    return (f"4-step preset with the Wan2.2-Lightning LoRAs, one per expert at strength 1 (lightx2v/Wan2.2-Lightning "
            f"`{LIGHTNING_SOURCE[kind]}/high_noise_model.safetensors` and `low_noise_model.safetensors`, repackaged by "
            f"ComfyUI under the names above): 4 steps, cfg 1 / 1 (no negative pass), shift 5, euler-distilled (the "
            f"solver Lightning was distilled with, timesteps 1000/937.5 on the high-noise expert, 833.3/625 on the "
            f"low-noise one), switch at {boundary}x1000, 81 frames at 16 fps. No CLIP.")


def a14b(kind, cfgs, shift, boundary, title, distilled=False):
    files = [f"wan2.2_{kind}_high_noise_14B_fp16.safetensors", f"wan2.2_{kind}_low_noise_14B_fp16.safetensors"]
    loras = [LIGHTNING[kind].format(n) for n in ("high", "low")] if distilled else [None, None]
    g = start_graph(title, [f"diffusion_models/{f}" for f in files] + [TE, VAE21] + [f"loras/{f}" for f in loras if f],
                    a14b_note(kind, cfgs, shift, boundary, distilled))
    high, low = (model_loader(g, f, [(lora, 1.0, "step-distillation LoRA")] if lora else (), title=t)
                 for f, lora, t in zip(files, loras, ("High-noise expert", "Low-noise expert")))
    enc, vae = text_side(g, PROMPT if kind == "t2v" else I2V_PROMPT), g.add("WanLeanVAELoader", ["wan_2.1_vae.safetensors"])
    if kind == "i2v":
        enc = image_cond(g, enc, vae, images(g, None, ("wan_example_start.png",)), (1280, 720, 81))
    head = [0, "fixed", 4, 1.0, 1.0, 5.0, "euler-distilled"] if distilled else [0, "fixed", 40, *cfgs, shift, "unipc"]
    s = sampler(g, "WanLeanSamplerA14B", head, (1280, 720, 81), (boundary, 0.0, 0, "comfy"),
                high_noise_model=(high, "model"), low_noise_model=(low, "model"),
                positive=(enc, "positive"), negative=(enc, "negative"))
    return finish(g, vae, s, 16, f"wan/{kind}_a14b")


LONG_PROMPTS = ("A cat walks on the grass towards a wooden fence, realistic style, soft sunlight.",
                "The cat jumps onto the fence and looks around, the camera slowly follows it.",
                "The cat sits on the fence at sunset, warm light, gentle breeze in the grass.")


def a14b_long_note(shift, cfgs, boundary, distilled, kind):
    per_clip = ("4 steps with the Wan2.2-Lightning LoRAs (one per expert, strength 1), cfg 1 / 1 (no negative pass), "
                "shift 5, euler-distilled" if distilled else
                f"Official per-clip defaults: 40 UniPC steps, shift {shift}, guidance {cfgs[0]} / {cfgs[1]}")
    how = ("each continuing from the last sampled latent frame of the one before (continuation auto = latent carry: "
           "never decoded in between; the 5 frames a clip re-creates are dropped)" if kind == "i2v" else
           "each continuing from the last 5 frames of the one before (cross-faded)")
    return (f"{per_clip}, expert switch at {boundary}x1000. 3 clips of 81 frames, {how}: 233 frames, about 15 s at "
            "16 fps. length must be 81 + (clips - 1) x 76.")


def a14b_long(kind, cfgs, shift, boundary, title, distilled=False):
    """Wan 2.2 A14B long video: Wan Long Video with both experts, 3 clips of 81 frames at 832x480 (overlap 5);
    T2V with one prompt line per clip; `distilled`: the 4-step Lightning preset on each clip."""
    loras = [[(LIGHTNING[kind].format(n), 1.0, "step-distillation LoRA")] if distilled else [] for n in ("high", "low")]
    head = [0, "fixed", 4, 1.0, 5.0, "euler-distilled"] if distilled else [0, "fixed", 40, cfgs[0], shift, "unipc"]
    return long_graph(kind, title, loras, a14b_long_note(shift, cfgs, boundary, distilled, kind),
                      [*head, 832, 480, 233, 81, 5, 1.0 if distilled else cfgs[1], boundary], ["auto", False, "auto"],
                      f"wan/{kind}_a14b_long" + ("_4step" if distilled else ""))


def long_graph(kind, title, loras, defaults, widgets, continuation, prefix):
    """Wan Long Video on the A14B experts (each with its `loras`: (file, strength, label)): its widgets before
    prompts, then the continuation widgets; T2V gets one prompt line per clip, I2V the example start image."""
    files = [f"wan2.2_{kind}_high_noise_14B_fp16.safetensors", f"wan2.2_{kind}_low_noise_14B_fp16.safetensors"]
    lora_files = [f"loras/{f}" for chain in loras for f, *_ in chain]
    g = start_graph(title, [f"diffusion_models/{f}" for f in files] + [TE, VAE21] + lora_files, defaults)
    high, low = (model_loader(g, f, chain, title=t)
                 for f, chain, t in zip(files, loras, ("High-noise expert", "Low-noise expert")))
    te = g.add("WanLeanTextEncoderLoader", ["umt5_xxl_fp16.safetensors"])
    enc = g.add("WanLeanTextEncode", [PROMPT if kind == "t2v" else I2V_PROMPT, OFFICIAL_NEGATIVE_PROMPT],
                text_encoder=(te, "text_encoder"))
    vae = g.add("WanLeanVAELoader", ["wan_2.1_vae.safetensors"])
    links = dict(model=(high, "model"), vae=(vae, "vae"), positive=(enc, "positive"), negative=(enc, "negative"),
                 low_noise_model=(low, "model"))
    prompts = ""
    if kind == "i2v":
        links["start_image"] = (images(g, None, ("wan_example_start.png",))[0][0], "IMAGE")
    else:
        links["text_encoder"], prompts = (te, "text_encoder"), "\n".join(LONG_PROMPTS)
    g.card["size"] = (832, 480, "3 x 81-frame clips")
    s = g.add("WanLeanLongVideo", [*widgets, prompts, *continuation], **links)
    g.add("WanLeanSaveVideo", [16, prefix, 19], frames=(s, "frames"))
    g.card["fps"] = 16
    return g


# Stable-Video-Infinity 2.0 Pro's LoRAs (vita-video-gen/svi-model version-2.0, their published names)
SVI_PRO = "SVI_Wan2.2-I2V-A14B_{}_noise_lora_v2.0_pro.safetensors"


def svi_pro_long(distilled=False):
    """Wan 2.2 I2V-A14B + the SVI 2.0 Pro LoRAs, continuation 'svi 2.0 pro', 3 clips: SVI's own settings
    (inference_svi_2.0_pro.py: 50 steps of its Euler flow-matching solver, shift 5, cfg 5, expert switch below
    t = 875, 832x480, seeds clip x 42 = seed 0 here) or the 4-step form (+ the Lightning LoRAs, cfg 1)."""
    chains = [[(SVI_PRO.format(n), 1.0, "SVI 2.0 Pro LoRA")] +
              ([(LIGHTNING["i2v"].format(n), 1.0, "step-distillation LoRA")] if distilled else []) for n in ("high", "low")]
    head = [0, "fixed", 4, 1.0, 5.0, "euler-distilled"] if distilled else [0, "fixed", 50, 5.0, 5.0, "euler"]
    cfg_low = 1.0 if distilled else 5.0
    settings = ("4 steps with the Lightning LoRAs after the SVI ones (strength 1 each), cfg 1 / 1 (SVI suggests 1-2 "
                "with Lightning; expect slower motion), shift 5, euler-distilled" if distilled else
                "SVI's settings: 50 Euler steps, shift 5, cfg 5 / 5 (its README example: 4), 832x480")
    note = (f"{settings}, expert switch at 0.875x1000. continuation 'svi 2.0 pro': slot 0 the start image's latent, "
            "slot 1 the previous clip's last sampled latent, zeros after; clip k seeded seed + 42 k (seed 0 = SVI's "
            "own seeds); clip 0 whole, every later clip without its first 5 frames: 81 + (clips - 1) x 76 frames, "
            "233 = 3 clips, about 15 s at 16 fps.")
    return long_graph("i2v", "Wan 2.2 I2V-A14B, SVI 2.0 Pro long video" + (" (4 steps)" if distilled else ""), chains,
                      note, [*head, 832, 480, 233, 81, 5, cfg_low, 0.875], ["svi 2.0 pro", False, "auto"],
                      "wan/i2v_a14b_svi_pro_long" + ("_4step" if distilled else ""))


def ti2v(with_image):
    model_file = "wan2.2_ti2v_5B_fp16.safetensors"
    g = start_graph(f"Wan 2.2 TI2V-5B ({'image' if with_image else 'text'} to video, 1280x704)",
                    [f"diffusion_models/{model_file}", TE, VAE22],
                    "Official defaults: 50 UniPC steps, shift 5, guidance 5, 121 frames at 24 fps. Sizes: multiples of 32.")
    model = g.add("WanLeanModelLoader", [model_file, "default", "auto", "off"])
    enc, vae = text_side(g, I2V_PROMPT if with_image else PROMPT), g.add("WanLeanVAELoader", ["wan2.2_vae.safetensors"])
    if with_image:
        enc = image_cond(g, enc, vae, images(g, None, ("wan_example_start.png",)), (1280, 704, 121))
    s = sampler(g, "WanLeanSampler", [0, "fixed", 50, 5.0, 5.0, "unipc"], (1280, 704, 121),
                model=(model, "model"), positive=(enc, "positive"), negative=(enc, "negative"))
    return finish(g, vae, s, 24, "wan/ti2v")


S2V_PROMPT = "A person speaks to the camera in a bright room, natural head and lip movement."


def s2v(title, pose=False, max_clips=1):
    model_file = "wan2.2_s2v_14B_bf16.safetensors"
    g = start_graph(title, [f"diffusion_models/{model_file}", TE, VAE21, "audio_encoders/wav2vec2_large_english_fp16.safetensors"],
                    "Official defaults: 40 UniPC steps per 80-frame clip, shift 3, guidance 4.5, 16 fps. Each clip continues "
                    "from the last 73 frames of the one before; max_clips 0 renders as many clips as the audio needs.")
    model = g.add("WanLeanModelLoader", [model_file, "default", "auto", "off"])
    enc, vae = text_side(g, S2V_PROMPT, S2V_NEGATIVE_PROMPT), g.add("WanLeanVAELoader", ["wan_2.1_vae.safetensors"])
    audio_enc = g.add("WanLeanAudioEncoderLoader", ["wav2vec2_large_english_fp16.safetensors"])
    image = g.add("LoadImage", ["wan_example_start.png", "image"], title="Reference image")
    audio = g.add("WanLeanLoadAudio", ["wan_example_speech.wav"], title="Speech")
    extra = {}
    if pose:
        video = g.add("LoadVideo", ["wan_example_pose.mp4", "video"], title="Pose video (16 fps)")
        parts = g.add("GetVideoComponents", [], video=(video, "VIDEO"))
        extra["pose_video"] = (parts, "images")
    s = g.add("WanLeanSpeechToVideo", [832, 480, 0, "fixed", 40, 4.5, 3.0, "unipc", max_clips, "audio", "comfy", "crop"],
              model=(model, "model"), vae=(vae, "vae"), audio_encoder=(audio_enc, "audio_encoder"),
              positive=(enc, "positive"), negative=(enc, "negative"), ref_image=(image, "IMAGE"), audio=(audio, "audio"),
              **extra)
    g.add("WanLeanSaveVideo", [16, "wan/s2v", 19], frames=(s, "frames"), audio=(s, "audio"))
    g.card.update(size=(832, 480, "one 80-frame clip" if max_clips == 1 else "80-frame clips"), fps=16)
    return g


WORKFLOWS = {
    "wan21_t2v_1.3B.json": t2v("wan2.1_t2v_1.3B_fp16.safetensors", 832, 480, "Wan 2.1 T2V-1.3B (832x480)"),
    "wan21_t2v_14B.json": t2v("wan2.1_t2v_14B_fp16.safetensors", 1280, 720, "Wan 2.1 T2V-14B (1280x720)"),
    "wan21_i2v_480p.json": i2v_21("wan2.1_i2v_480p_14B_fp16.safetensors", 832, 480, 40, 3.0, "Wan 2.1 I2V-14B-480P"),
    "wan21_i2v_720p.json": i2v_21("wan2.1_i2v_720p_14B_fp16.safetensors", 1280, 720, 40, 5.0, "Wan 2.1 I2V-14B-720P"),
    "wan21_flf2v_720p.json": i2v_21("wan2.1_flf2v_720p_14B_fp16.safetensors", 1280, 720, 50, 16.0,
                                    "Wan 2.1 FLF2V-14B (first and last frame, 720p)", flf=True),
    "wan22_t2v_a14b.json": a14b("t2v", (4.0, 3.0), 12.0, 0.875, "Wan 2.2 T2V-A14B (two experts)"),
    "wan22_i2v_a14b.json": a14b("i2v", (3.5, 3.5), 5.0, 0.9, "Wan 2.2 I2V-A14B (two experts)"),
    "wan22_t2v_a14b_4step.json": a14b("t2v", (1.0, 1.0), 5.0, 0.875, "Wan 2.2 T2V-A14B (4 steps, Lightning LoRAs)",
                                      distilled=True),
    "wan22_i2v_a14b_4step.json": a14b("i2v", (1.0, 1.0), 5.0, 0.9, "Wan 2.2 I2V-A14B (4 steps, Lightning LoRAs)",
                                      distilled=True),
    "wan21_t2v_14b_lightx2v.json": t2v("wan2.1_t2v_14B_fp16.safetensors", 832, 480, "Wan 2.1 T2V-14B (4 steps, lightx2v LoRA)",
                                       lora=LIGHTX2V["t2v"]),
    "wan21_i2v_480p_lightx2v.json": i2v_21("wan2.1_i2v_480p_14B_fp16.safetensors", 832, 480, 4, 5.0,
                                           "Wan 2.1 I2V-14B-480P (4 steps, lightx2v LoRA)", lora=LIGHTX2V["i2v"]),
    "wan22_t2v_a14b_long.json": a14b_long("t2v", (4.0, 3.0), 12.0, 0.875, "Wan 2.2 T2V-A14B, long video (3 clips, a prompt each)"),
    "wan22_i2v_a14b_long.json": a14b_long("i2v", (3.5, 3.5), 5.0, 0.9, "Wan 2.2 I2V-A14B, long video (3 chained clips)"),
    "wan22_t2v_a14b_long_4step.json": a14b_long("t2v", (1.0, 1.0), 5.0, 0.875,
                                                "Wan 2.2 T2V-A14B, long video (4 steps, Lightning LoRAs)", distilled=True),
    "wan22_i2v_a14b_long_4step.json": a14b_long("i2v", (1.0, 1.0), 5.0, 0.9,
                                                "Wan 2.2 I2V-A14B, long video (4 steps, Lightning LoRAs)", distilled=True),
    "wan22_i2v_a14b_svi_pro_long.json": svi_pro_long(),
    "wan22_i2v_a14b_svi_pro_long_4step.json": svi_pro_long(distilled=True),
    "wan22_ti2v_5b_t2v.json": ti2v(False),
    "wan22_ti2v_5b_i2v.json": ti2v(True),
    "wan22_s2v.json": s2v("Wan 2.2 S2V-14B (image + speech, one clip)"),
    "wan22_s2v_pose.json": s2v("Wan 2.2 S2V-14B with a pose video", pose=True),
    "wan22_s2v_long.json": s2v("Wan 2.2 S2V-14B, long video (clips follow the audio)", max_clips=0),
}

THUMB_SIZE = 256  # the template browser shows square cards
FAMILY_COLOURS = {"Wan 2.1": (52, 104, 196), "Wan 2.2": (124, 72, 190)}
# node types that are the workflow's inputs -> their picture on the card (None: a drawn glyph)
INPUT_PICTURES = {
    "WanLeanTextEncode": lambda n: None,
    "LoadImage": lambda n: draw(0.2 if n["widgets_values"][0] == EXAMPLE_IMAGES[0] else 0.8),  # example_inputs' suns
    "WanLeanLoadAudio": lambda n: None,
    "LoadVideo": lambda n: Image.fromarray(pose_frame(4)),
}


@functools.lru_cache
def font(size):
    return ImageFont.load_default(size)


def wrap(d, text, size, width):
    """Greedy word wrap to `width` pixels."""
    lines = []
    for word in text.split():
        if lines and d.textlength(f"{lines[-1]} {word}", font=font(size)) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def title_parts(title):
    """'Wan 2.2 T2V-A14B (two experts)' -> ('Wan 2.2', 'T2V-A14B', 'two experts')."""
    words = title.split(" ", 3) + [""]
    rest = words[3].strip()
    if rest.startswith("(") and rest.endswith(")"):
        rest = rest[1:-1]
    return " ".join(words[:2]), words[2].rstrip(","), rest


def workflow_inputs(g):
    """[(name, picture)] of what the user gives the workflow: the prompt, images, speech, a pose video."""
    return [(n.get("title", "prompt").split(" (")[0].lower(), INPUT_PICTURES[n["type"]](n))
            for n in g.nodes if n["type"] in INPUT_PICTURES]


def input_tile(d, img, x, y, name, picture, side=54):
    """One input: its example picture (or a drawn glyph: text lines, a waveform) above its name's first word."""
    box = [x, y, x + side, y + side]
    if picture is not None:
        img.paste(picture.resize((side, side)), (x, y))
    else:
        d.rectangle(box, fill=(46, 54, 70))
        if name == "speech":  # a waveform: bars under a syllable-like envelope
            for k in range(11):
                half = 2 + 20 * abs(math.sin(0.9 * k) * math.sin(0.37 * k + 0.4))
                bar_x = x + 7 + 4 * k
                d.line([(bar_x, y + side / 2 - half), (bar_x, y + side / 2 + half)], fill=(120, 220, 160), width=2)
        else:
            for k, length in enumerate((38, 30, 42, 22)):
                d.line([(x + 7, y + 12 + 10 * k), (x + 7 + length, y + 12 + 10 * k)], fill=(200, 205, 215), width=3)
    d.rectangle(box, outline=(150, 160, 180))
    d.text((x + side / 2, y + side + 4), name.split()[0], font=font(11), fill=(200, 205, 215), anchor="ma")


def thumbnail(g):
    """The template card, an honest title card read from the recipe: family, model, note, what goes in,
    size / frames / fps, and a tile per input (the example images the workflow loads)."""
    w = THUMB_SIZE
    family, model, note_text = title_parts(g.card["title"])
    img = Image.new("RGB", (w, w), (28, 33, 44))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, 34], fill=FAMILY_COLOURS[family])
    d.text((12, 17), family, font=font(18), fill="white", anchor="lm")
    d.text((w - 12, 17), "Wan Lean", font=font(12), fill=(225, 230, 240), anchor="rm")
    d.text((12, 42), model, font=font(30), fill="white")
    inputs = workflow_inputs(g)
    y = 82
    width, height, frames = g.card["size"]
    note_text = "" if note_text == f"{width}x{height}" else note_text
    for text, size, colour in ((note_text, 13, (170, 180, 200)),
                               (" + ".join(name for name, _ in inputs) + " to video", 14, (250, 200, 90))):
        for line in wrap(d, text, size, w - 24):
            d.text((12, y), line, font=font(size), fill=colour)
            y += size + 4
    frames = f"{frames} frames" if isinstance(frames, int) else frames
    d.text((12, y + 2), f"{width}x{height} · {frames} · {g.card['fps']} fps", font=font(13), fill=(225, 230, 240))
    for k, (name, picture) in enumerate(inputs):
        input_tile(d, img, 12 + 62 * k, w - 76, name, picture)
    return img


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80, optimize=True)
    return buf.getvalue()


def write_all(folder=os.path.join(ROOT, "workflows")):
    """Write every workflow and its thumbnail into `folder`; returns the paths written."""
    paths = []
    for name, g in WORKFLOWS.items():
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(g.workflow(), f, indent=1, ensure_ascii=False)
            f.write("\n")
        with open(path[:-len(".json")] + ".jpg", "wb") as f:
            f.write(jpeg(thumbnail(g)))
        paths += [path, path[:-len(".json")] + ".jpg"]
    return paths


if __name__ == "__main__":
    for written in write_all():
        print("wrote " + os.path.relpath(written, ROOT))
