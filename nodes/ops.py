"""ComfyUI layer namespaces for what wan_core.checkpoint reads: ComfyUI's casting ops for any float dtype (fp8
included), and casting ops whose Linear decodes packed weights when it runs (GGUF blocks; ComfyUI's scaled fp8,
nvfp4, mxfp8 and int8 formats in every layout: wan_core.quant), so the packed tensors are what ComfyUI stores,
offloads and streams. Both hosts run the same layers: 0.3.75's comfy.ops.scaled_fp8_ops is gone from newer ComfyUI
(0.4.0 on), whose mixed_precision_ops would need its QuantizedTensor (comfy_kitchen), absent from older hosts."""
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.ops

from ..wan_core.quant import QuantLinear


class QuantOps(comfy.ops.manual_cast):
    class Linear(QuantLinear, comfy.ops.manual_cast.Linear):
        """Packed tensors stay the parameters; each call moves them to the input's device, decodes them to the
        input's dtype and applies ComfyUI's weight patches (LoRA wrappers, low-VRAM patches) to the result."""

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
    """The ops namespace a `wan_core.checkpoint.Checkpoint` computes with: packed weights (GGUF, ComfyUI's quantized
    formats) -> QuantOps, decoded per layer at use on any device (load_device does not change that); everything else
    -> manual_cast (weights cast to the input's dtype at use)."""
    return QuantOps if ckpt.quantized else comfy.ops.manual_cast
