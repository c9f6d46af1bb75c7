"""Wan Lean: a ComfyUI node pack for Alibaba's Wan video models (math in wan_core/, adapters in nodes/).

Registered through ComfyUI's V3 extension entry point only: ComfyUI takes NODE_CLASS_MAPPINGS first when a package
has both, so the pack exports none."""
import sys

if "folder_paths" in sys.modules:  # loaded by ComfyUI
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
else:  # imported as a plain package (pytest collecting the repo, or a tool): no ComfyUI here, so no nodes
    __all__ = []
