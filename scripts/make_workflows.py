"""Writes the UI-format workflows in workflows/ from the compact graphs below (run after changing a node's widgets).

Each graph: nodes as (id, type, title, widgets_values, {input_name: (from_id, from_slot)}), laid out left to right.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from wan_core.tokenizer import OFFICIAL_NEGATIVE_PROMPT  # noqa: E402

# output (name, type) lists and input (name, type) lists of the pack's nodes, in slot order
OUTPUTS = {
    "WanLeanModelLoader": [("model", "WANLEAN_MODEL")],
    "WanLeanVAELoader": [("vae", "WANLEAN_VAE")],
    "WanLeanTextEncoderLoader": [("text_encoder", "WANLEAN_TEXT_ENCODER")],
    "WanLeanTextEncode": [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "WanLeanSampler": [("latent", "LATENT")],
    "WanLeanVAEDecode": [("frames", "IMAGE")],
    "WanLeanSaveVideo": [],
    "MarkdownNote": [],
}
INPUTS = {
    "WanLeanTextEncode": [("text_encoder", "WANLEAN_TEXT_ENCODER")],
    "WanLeanSampler": [("model", "WANLEAN_MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "WanLeanVAEDecode": [("vae", "WANLEAN_VAE"), ("latent", "LATENT")],
    "WanLeanSaveVideo": [("frames", "IMAGE")],
}
PROMPT = ("A cat walks on the grass, realistic style, soft sunlight, the camera slowly follows it.")


def t2v_graph(model_file, width, height, note):
    return [
        (1, "MarkdownNote", "Model files", [note], {}),
        (2, "WanLeanModelLoader", None, [model_file, "default"], {}),
        (3, "WanLeanTextEncoderLoader", None, ["umt5_xxl_fp16.safetensors"], {}),
        (4, "WanLeanVAELoader", None, ["wan_2.1_vae.safetensors"], {}),
        (5, "WanLeanTextEncode", None, [PROMPT, OFFICIAL_NEGATIVE_PROMPT], {"text_encoder": (3, 0)}),
        (6, "WanLeanSampler", None, [0, "fixed", 50, 5.0, 5.0, "unipc", width, height, 81],
         {"model": (2, 0), "positive": (5, 0), "negative": (5, 1)}),
        (7, "WanLeanVAEDecode", None, [], {"vae": (4, 0), "latent": (6, 0)}),
        (8, "WanLeanSaveVideo", None, [16, "wan/t2v", 19], {"frames": (7, 0)}),
    ]


def ui_workflow(graph):
    nodes, links = [], []
    for order, (nid, ntype, title, widgets, wired) in enumerate(graph):
        inputs = []
        for name, typ in INPUTS.get(ntype, []):
            src = wired.get(name)
            link_id = None
            if src:
                link_id = len(links) + 1
                links.append([link_id, src[0], src[1], nid, len(inputs), typ])
            inputs.append({"name": name, "type": typ, "link": link_id})
        node = {"id": nid, "type": ntype, "pos": [40 + 360 * (order // 2), 60 + 320 * (order % 2)], "size": [320, 260],
                "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                "outputs": [{"name": n, "type": t, "links": []} for n, t in OUTPUTS[ntype]],
                "properties": {"Node name for S&R": ntype}, "widgets_values": widgets}
        if title:
            node["title"] = title
        nodes.append(node)
    by_id = {n["id"]: n for n in nodes}
    for link_id, src, slot, *_ in links:
        by_id[src]["outputs"][slot]["links"].append(link_id)
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def note(model_file, size):
    return (f"**Wan 2.1 text-to-video ({size})**\n\n"
            f"- `models/diffusion_models/{model_file}`\n"
            "- `models/text_encoders/umt5_xxl_fp16.safetensors` (or the official `models_t5_umt5-xxl-enc-bf16.pth` "
            "with its `google/umt5-xxl/` tokenizer folder beside it)\n"
            "- `models/vae/wan_2.1_vae.safetensors` (or the official `Wan2.1_VAE.pth`)\n\n"
            "Official defaults: 50 UniPC steps, shift 5, guidance 5, 81 frames at 16 fps.")


WORKFLOWS = {
    "wan21_t2v_1.3B.json": t2v_graph("wan2.1_t2v_1.3B_fp16.safetensors", 832, 480,
                                     note("wan2.1_t2v_1.3B_fp16.safetensors", "1.3B, 832x480")),
    "wan21_t2v_14B.json": t2v_graph("wan2.1_t2v_14B_fp16.safetensors", 1280, 720,
                                    note("wan2.1_t2v_14B_fp16.safetensors", "14B, 1280x720")),
}

if __name__ == "__main__":
    for name, graph in WORKFLOWS.items():
        with open(os.path.join(ROOT, "workflows", name), "w", encoding="utf-8") as f:
            json.dump(ui_workflow(graph), f, indent=1, ensure_ascii=False)
            f.write("\n")
        print("wrote workflows/" + name)
