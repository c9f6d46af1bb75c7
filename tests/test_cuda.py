"""CUDA-only checks (marker `cuda`; skipped without a CUDA device; bench/gpu_check.sh runs them first): the flash /
sage attention kernels against SDPA, ring-attention blocks through the fused kernel, torch.compile with inductor,
ComfyUI's quantized formats decoded on the GPU inside our DiT, and the sequence-parallel DiT over NCCL with one
process per visible GPU."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import scale_close
from test_attention import qkv, reference
from wan_core import attention as att, convert, parallel, sp_attention
from wan_core.dit import WanDiT
from wan_core.pipeline import Cond, Expert, generate
from fixtures.smoke import randomize_

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TINY = dict(dim=256, ffn_dim=512, num_layers=2, text_dim=32, freq_dim=64)


def tiny_inputs(device, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 8, 12, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    return x.to(device, dtype), torch.tensor([700.0, 300.0], device=device), ctx.to(device, dtype)


@pytest.mark.parametrize("name, tol", [("flash", 2e-2), ("sage", 5e-2)])
def test_kernels_match_sdpa(name, tol):
    if att._module(name) is None:
        pytest.skip(f"{name} kernel not installed")
    q, k, v = qkv(lq=1024, lk=512, heads=4, dim=128, batch=1, device="cuda", dtype=torch.bfloat16)
    assert att.resolve(q, name) == name
    out = att.attention(q, k, v, backend=name).float()
    ref = reference(q, k, v).float()
    print(f"{name} vs float64: {(out - ref).abs().max().item() / ref.abs().max().item():.1e} of the scale")
    assert (out - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ring_blocks_merge_on_cuda(dtype):
    """Ring attention's per-block kernel (log-sum-exp from the fused kernel) merged over 3 uneven key blocks equals
    attention over all keys, at a real head size."""
    q, k, v = qkv(lq=300, lk=700, heads=4, dim=128, batch=1, device="cuda", dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # the ring works on [B, H, L, D]
    out = lse = None
    for lo, hi in ((0, 250), (250, 251), (251, 700)):
        out, lse = sp_attention.merge_attention(out, lse, *sp_attention.block_attention(q, k[:, :, lo:hi], v[:, :, lo:hi]))
    ref = reference(*(t.transpose(1, 2) for t in (q, k, v))).float()
    scale_close(out.transpose(1, 2).flatten(2), ref, rel=2e-2)


def test_inductor_blocks_match_eager_without_recompiles():
    from torch._dynamo.utils import counters
    from wan_core.compile import compile_blocks
    model = randomize_(WanDiT(**TINY), seed=1).cuda().to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(3)
    cond, uncond = Cond(torch.randn(7, 32, generator=g)), Cond(torch.randn(4, 32, generator=g))

    def run(callback=None):
        return generate([Expert(lambda: model, 5.0)], cond, uncond, seed=0, steps=4, shift=5.0, sampler="unipc",
                        width=128, height=96, length=9, device="cuda", dtype=torch.bfloat16, callback=callback)
    eager = run()
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, "blocks")
    seen = []
    out = run(lambda *_: seen.append(counters["stats"]["unique_graphs"]))
    assert len(set(seen)) == 1, seen  # compiled during the first step, never after
    print(f"inductor vs eager (bf16): {scale_close(out, eager, rel=5e-2):.1e} of the scale")


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8_tensorwise", "mxfp8", "nvfp4"])
def test_quantized_dit_decodes_on_cuda(fmt):
    """A DiT in ComfyUI's quantized layout (fixtures.quant_writer) keeps its packed tensors on the GPU and decodes them
    there per layer (wan_core.quant, the code nodes/ops.py runs): in bf16 within bf16 compute error of the same packed
    model run in fp32 on the CPU (which tests/test_zoo.py checks against the fp32 original)."""
    from fixtures.quant_writer import comfy_quant_file
    from wan_core.castops import casting_ops
    sd = randomize_(WanDiT(**TINY), seed=2).state_dict()
    packed = convert.pack_quantized(comfy_quant_file(sd, lambda key: fmt)[0])
    cpu = WanDiT.from_state_dict(dict(packed), ops=casting_ops()).eval()
    gpu = WanDiT.from_state_dict(dict(packed), ops=casting_ops()).cuda().eval()
    q = gpu.blocks[0].ffn[0]
    assert q.qtype == fmt and q.weight.is_cuda and q.weight.dtype != torch.bfloat16
    with torch.no_grad():
        ref = cpu(*tiny_inputs("cpu", torch.float32))
        out = gpu(*tiny_inputs("cuda", torch.bfloat16)).float().cpu()
    print(f"{fmt} on CUDA (bf16) vs CPU (fp32): {scale_close(out, ref, rel=5e-2):.1e} of the scale")


def _nccl_worker(rank, world, init, out_dir):
    parallel.init_distributed(rank, world, init, f"cuda:{rank}")
    model = randomize_(WanDiT(**TINY), seed=4).to(f"cuda:{rank}").eval()
    x, t, ctx = tiny_inputs(f"cuda:{rank}", torch.float32)
    probe = torch.full((1,), float(rank + 1), device=f"cuda:{rank}")
    dist.all_reduce(probe)
    with torch.no_grad():
        out = parallel.ParallelDiT(model, parallel.make_mesh(attention_mode="auto"))(x, t, ctx)
    torch.save((out.cpu(), probe.item()), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_nccl_sequence_parallel_equals_single_process(tmp_path):
    """One process per visible GPU over NCCL (on one GPU: a world of 1, which checks NCCL and the wiring only)."""
    world = torch.cuda.device_count()
    mp.spawn(_nccl_worker, args=(world, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=world)
    model = randomize_(WanDiT(**TINY), seed=4).cuda().eval()
    with torch.no_grad():
        ref = model(*tiny_inputs("cuda", torch.float32)).cpu()
    for rank in range(world):
        out, total = torch.load(tmp_path / f"rank{rank}.pt")
        assert total == world * (world + 1) / 2  # the all-reduce ran over NCCL
        scale_close(out, ref, rel=1e-4)
