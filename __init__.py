"""Wan Lean: a ComfyUI node pack for Alibaba's Wan video models (math in wan_core/, adapters in nodes/)."""
import sys

if "folder_paths" in sys.modules:  # loaded by ComfyUI
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain package (pytest collecting the repo, or a tool): no ComfyUI here, so no nodes
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
