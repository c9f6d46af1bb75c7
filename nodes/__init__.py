"""ComfyUI adapters for wan_core on ComfyUI's V3 schema: each module lists its node classes in NODES, and the pack's
extension hands them all to ComfyUI once."""
from comfy_api.latest import ComfyExtension

from . import conditioning, decode, image, loaders, sampler, video
from . import long_video, lora, parallel, s2v

MODULES = (loaders, conditioning, image, sampler, decode, video, lora, s2v, parallel, long_video)
NODES = [node for module in MODULES for node in module.NODES]


class WanLeanExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint():
    return WanLeanExtension()
