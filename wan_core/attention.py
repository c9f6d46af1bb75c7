"""The one attention entry point of the core. Tensors are [B, L, heads, head_dim]."""
import torch.nn.functional as F


def attention(q, k, v):
    """Scaled dot-product attention over [B, L, H, D] inputs; returns [B, Lq, H*D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)
