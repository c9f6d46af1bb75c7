"""ComfyUI adapters for wan_core: each module contributes its NODE_CLASS_MAPPINGS."""
from . import conditioning, decode, image, loaders, sampler, video
from . import long_video, lora, parallel, s2v

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (loaders, conditioning, image, sampler, decode, video, lora, s2v, parallel, long_video):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
