"""ComfyUI layer namespaces for what wan_core.checkpoint reads: ComfyUI's casting ops for any float dtype
(fp8 included), ComfyUI's own scaled-fp8 ops for files with per-layer scales, and casting ops whose Linear
dequantises GGUF weights when it runs (so the quantised blocks are what ComfyUI stores, offloads and streams)."""
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.ops

from ..wan_core.gguf import QuantLinear


class GGUFOps(comfy.ops.manual_cast):
    class Linear(QuantLinear, comfy.ops.manual_cast.Linear):
        """Raw GGUF blocks stay the parameter; each call moves them to the input's device, dequantises to the
        input's dtype and applies ComfyUI's weight patches (low-VRAM LoRA) to the result."""

        def forward_comfy_cast_weights(self, input):
            if self.qtype is None:
                return super().forward_comfy_cast_weights(input)
            weight = self.dequantized_weight(input.dtype, input.device)
            for fn in self.weight_function:
                weight = fn(weight)
            bias = None
            if self.bias is not None:
                bias = mm.cast_to(self.bias, input.dtype, input.device, copy=bool(self.bias_function))
                for fn in self.bias_function:
                    bias = fn(bias)
            return F.linear(input, weight, bias)


def ops_for(ckpt, load_device=None):
    """The ops namespace a `wan_core.checkpoint.Checkpoint` computes with, chosen as ComfyUI chooses for its own
    models: GGUF -> GGUFOps; scaled fp8 -> comfy.ops.scaled_fp8_ops (fp8 matmuls only where the device has
    them and the file allows); everything else -> manual_cast (weights cast to the input's dtype at use)."""
    if ckpt.quantized:
        return GGUFOps
    if ckpt.scaled_fp8 is not None:
        fast = ckpt.input_scales and mm.supports_fp8_compute(load_device)
        return comfy.ops.scaled_fp8_ops(fp8_matrix_mult=fast, scale_input=ckpt.input_scales,
                                        override_dtype=ckpt.scaled_fp8)
    return comfy.ops.manual_cast
