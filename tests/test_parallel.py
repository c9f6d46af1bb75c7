"""Sequence-parallel (Ulysses / ring attention), CFG-parallel and combined runs over gloo with 2 and 4 processes
equal the single-process output on identical random weights (t2v, per-token t, i2v, S2V; head and token counts
that do not divide the world size), the attention method that ran is the expected one, ring attention's block
math is exact, the multi-device node rebuilds the loaded model (file, weight dtype, LoRAs) in its workers and equals
the single-process sampler, and the worker pool ends every worker on a crash (on an interrupt and /free through a
real server: tests/test_parallel_server.py)."""
import dataclasses
import os
import sys

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import scale_close
from test_lora import pack_module, smoke_loras  # noqa: F401  (a fixture: two LoRAs for the smoke T2V-1.3B)
from wan_core import model_source, parallel, sp_attention, workers
from wan_core.dit import WanDiT
from wan_core.pipeline import Cond, Expert, generate
from wan_core.s2v import WanS2V
from fixtures.smoke import randomize_

TEXT = 32
T2V = "wan2.1_t2v_1.3B_fp16.safetensors"


def _models():
    """Tiny models (head dim 128): 2 heads (dim 256: Ulysses on 2 ranks, ring on 4), 3 heads (ring on 2 and 4) and
    4 heads (Ulysses on 2 and 4)."""
    torch.manual_seed(0)
    return {
        "t2v": randomize_(WanDiT(dim=256, ffn_dim=64, num_layers=2, text_dim=TEXT, freq_dim=32), seed=1),
        "t2v3": randomize_(WanDiT(dim=384, ffn_dim=64, num_layers=1, text_dim=TEXT, freq_dim=32), seed=9),
        "t2v4": randomize_(WanDiT(dim=512, ffn_dim=64, num_layers=1, text_dim=TEXT, freq_dim=32), seed=2),
        "i2v": randomize_(WanDiT(dim=256, ffn_dim=64, num_layers=2, in_dim=36, text_dim=TEXT, freq_dim=32,
                                 clip_dim=24), seed=3),
        "s2v": randomize_(WanS2V(dim=256, ffn_dim=64, num_layers=2, text_dim=TEXT, freq_dim=32, audio_dim=16,
                                 audio_layers=3, audio_inject_layers=(0, 1)), seed=4),
    }


def _inputs():
    """(model, args, kwargs) per case, batch 2 = (cond, uncond) as the samplers batch them."""
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.tensor([700.0, 700.0])
    x = r(2, 16, 3, 6, 10)  # 3 x 3 x 5 = 45 tokens: divides neither 2 nor 4
    per_token = torch.full((2, 45), 700.0)
    per_token[:, :15] = 0  # TI2V-style: the first frame's tokens at t = 0
    s2v = dict(audio=r(2, 3, 16, 12), ref_latent=r(1, 16, 1, 8, 8), motion_latent=r(1, 16, 19, 8, 8))
    clip0 = dict(audio=r(2, 3, 16, 8), ref_latent=r(1, 16, 1, 6, 10))  # no motion yet
    return {
        "t2v": ("t2v", (x, t, r(2, 7, TEXT)), {}),
        "t2v_per_token_t": ("t2v", (x, per_token, r(2, 7, TEXT)), {}),
        "t2v_3heads": ("t2v3", (x, t, r(2, 7, TEXT)), {}),
        "t2v_4heads": ("t2v4", (x, t, r(2, 7, TEXT)), {}),
        "i2v": ("i2v", (x, t, r(2, 7, TEXT)), dict(clip=r(2, 5, 24), y=r(2, 20, 3, 6, 10))),
        "s2v": ("s2v", (r(2, 16, 3, 8, 8), t, r(2, 7, TEXT)), s2v),  # 48 noisy + 16 ref + 24 motion tokens
        "s2v_clip0": ("s2v", (r(2, 16, 2, 6, 10), t, r(2, 7, TEXT)), clip0),  # 30 noisy + 15 ref = 45 tokens
    }


def _sample(model):
    cond, uncond = Cond(torch.randn(6, TEXT, generator=torch.Generator().manual_seed(6))), Cond(torch.zeros(3, TEXT))
    return generate([Expert(lambda: model, 5.0)], cond, uncond, seed=7, steps=2, shift=5.0, sampler="unipc",
                    width=80, height=48, length=5)


def _reference():
    models = _models()
    with torch.no_grad():
        out = {name: models[m](*a, **kw) for name, (m, a, kw) in _inputs().items()}
        out["sample"] = _sample(models["t2v"])
    return out


LAYOUTS = {2: [("sp", False, "auto"), ("sp_ring", False, "ring"), ("cfg", True, "auto")],
           4: [("sp", False, "auto"), ("cfg_sp", True, "auto")]}
HEADS = {"t2v": 2, "t2v3": 3, "t2v4": 4, "i2v": 2, "s2v": 2}


def expected_method(mode, heads, sp_size):
    """The self-attention a sequence group of sp_size ranks must run ({} without one)."""
    if sp_size == 1:
        return set()
    return {"ring" if mode == "ring" or heads % sp_size else "ulysses"}


def _forward_worker(rank, world, init, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    models, inputs = _models(), _inputs()
    results, methods = {}, {}
    with torch.no_grad():
        for layout, cfg, mode in LAYOUTS[world]:
            mesh = parallel.make_mesh(cfg_parallel=cfg, attention_mode=mode)
            for name, (m, a, kw) in [*inputs.items(), ("sample", ("t2v", None, None))]:
                if mesh.sp is not None:
                    mesh.sp.calls.clear()
                model = parallel.ParallelDiT(models[m], mesh)
                results[f"{layout}/{name}"] = _sample(model) if name == "sample" else model(*a, **kw)
                methods[f"{layout}/{name}"] = set(mesh.sp.calls) if mesh.sp is not None else set()
    torch.save((results, methods), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_equals_single_process(world, reference, tmp_path):
    mp.spawn(_forward_worker, args=(world, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=world)
    ranks, methods = zip(*(torch.load(tmp_path / f"rank{r}.pt") for r in range(world)))
    assert len(ranks[0]) == len(LAYOUTS[world]) * len(reference)
    layouts, models = {name: (cfg, mode) for name, cfg, mode in LAYOUTS[world]}, {**_inputs(), "sample": ("t2v",)}
    for key, out in ranks[0].items():
        layout, case = key.split("/")
        cfg, mode = layouts[layout]
        assert methods[0][key] == expected_method(mode, HEADS[models[case][0]], world // (2 if cfg else 1)), key
        ref = reference[case]
        assert out.shape == ref.shape, key
        scale_close(out, ref, rel=1e-5)
        for other in ranks[1:]:  # every rank returns the same tensor (the samplers stay in step)
            assert torch.equal(other[key], out), key


def test_every_case_has_a_ring_run():
    """Each case (t2v, per-token t, i2v, S2V, sampling) runs ring attention in some layout with 2 and 4 ranks (but the
    4-head model on 4 ranks: Ulysses, the case for it); ring within CFG groups: the 3-head model on 4 ranks."""
    models = {**_inputs(), "sample": ("t2v",)}
    for world, layouts in LAYOUTS.items():
        for case, (m, *_) in models.items():
            if (world, m) == (4, "t2v4"):
                continue
            assert any(expected_method(mode, HEADS[m], world // (2 if cfg else 1)) == {"ring"}
                       for _, cfg, mode in layouts), (world, case)


@pytest.mark.parametrize("device_dtype", ["cpu-float32", "cpu-bfloat16", "math-float32"])
def test_ring_blocks_merge_to_full_attention(device_dtype):
    """Attention of 11 queries over 3 uneven key blocks, merged by log-sum-exp, equals attention over all keys."""
    kind, dtype = device_dtype.split("-")
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 64, generator=g).to(dtype) for n in (11, 23, 23))
    full = sp_attention.attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
    out = lse = None
    for lo, hi in ((0, 9), (9, 10), (10, 23)):
        part = (sp_attention._lse_math if kind == "math" else sp_attention.block_attention)(q, k[:, :, lo:hi], v[:, :, lo:hi])
        out, lse = sp_attention.merge_attention(out, lse, *part)
    assert out.dtype == lse.dtype == torch.float32
    scale_close(out.transpose(1, 2).flatten(2), full, rel=1e-5 if dtype == torch.float32 else 2e-2)
    if kind == "cpu" and dtype == torch.float32:  # the fused kernel's lse is the math one's
        scale_close(sp_attention.block_attention(q, k, v)[1], sp_attention._lse_math(q, k, v)[1], rel=1e-6)


def test_ulysses_refuses_indivisible_heads():
    sp = sp_attention.SequenceParallel.__new__(sp_attention.SequenceParallel)
    sp.mode, sp.size = "ulysses", 4
    with pytest.raises(ValueError, match="head count"):
        sp.attention(*(torch.zeros(1, 8, 2, 128) for _ in range(3)))


def test_parse_devices():
    assert workers.parse_devices("cpu:2") == ["cpu", "cpu"]
    assert workers.parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    for bad in ("cuda:0", "gpu0,gpu1"):
        with pytest.raises(ValueError, match="devices"):
            workers.parse_devices(bad)


def test_check_devices_before_any_worker_starts():
    """What this machine cannot run is refused naming `devices`: CUDA devices it lacks, meta, too many CPU processes."""
    assert workers.check_devices(["cpu", "cpu"]) == ["cpu", "cpu"]
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = f"cuda:{cuda},cuda:{cuda + 1}"
    with pytest.raises(ValueError, match=f"devices '{missing}': this machine has"):
        workers.check_devices(workers.parse_devices(missing), missing)
    with pytest.raises(ValueError, match="devices 'meta,meta': 'meta' devices cannot run"):
        workers.check_devices(workers.parse_devices("meta,meta"), "meta,meta")
    with pytest.raises(ValueError, match="devices 'cpu:100000': 100000 CPU processes .* use at most cpu:"):
        workers.check_devices(workers.parse_devices("cpu:100000"), "cpu:100000")


# ----------------------------------------------------------------------------- the worker pool

def _steps_job(models, mesh, device, stop_check, steps, crash_rank=None):
    """A job that talks on every step (as sampling does) and can make one rank die."""
    for i in range(steps):
        if i == 2 and dist.get_rank() == crash_rank:
            os._exit(3)
        x = torch.ones(1)
        dist.all_reduce(x)
        stop_check()
    return os.getpid()


def _gone(pids):
    return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_node_pool_parity_reuse_and_crash(smoke_models, smoke_loras):
    """The multi-device node on a loaded model with a LoRA (2 CPU workers, CFG-parallel) returns the latent of the
    single-process sampler on the same model and reuses its pool; a worker crash ends every worker; the caller goes
    on. (An interrupt through a real server: tests/test_parallel_server.py.)"""
    node_module, loaders, lora, sampler = (pack_module(n) for n in ("parallel", "loaders", "lora", "sampler"))
    import folder_paths
    for kind in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(kind, os.path.join(smoke_models, kind))
    model = loaders.WanLeanModelLoader.execute(T2V, "default")[0]
    with_lora = lora.WanLeanLoraLoader.execute(model, smoke_loras[1], 0.8)[0]
    g = torch.Generator().manual_seed(8)
    pos, neg = [[torch.randn(1, 6, 64, generator=g), {}]], [[torch.zeros(1, 3, 64), {}]]
    args = dict(seed=3, steps=2, cfg=4.0, shift=5.0, sampler="unipc", width=64, height=48, length=5)
    node = node_module.WanLeanParallelSampler
    layout = dict(devices="cpu:2", cfg_parallel=True, attention="auto")
    try:
        out = node.execute(with_lora, pos, neg, **layout, **args)[0]["samples"]
        pool = node_module._POOL["pool"]
        again = node.execute(with_lora, pos, neg, **layout, **args)[0]["samples"]
        assert node_module._POOL["pool"] is pool and torch.equal(out, again)
        pids = [p.pid for p in pool.procs]
        assert pool.run(_steps_job, 3) in pids
        with pytest.raises(RuntimeError, match="parallel worker .* all workers were stopped"):
            pool.run(_steps_job, 10 ** 9, 1)  # worker 1 dies at step 2
        assert not pool.alive and _gone(pids)
    finally:
        node_module.close_pool()
    ref = sampler.WanLeanSampler.execute(with_lora, pos, neg, **args)[0]["samples"]
    scale_close(out, ref, rel=1e-5)
    plain = sampler.WanLeanSampler.execute(model, pos, neg, **args)[0]["samples"]
    assert (plain - ref).abs().max() > 1e-2 * ref.abs().max(), "the LoRA changed nothing"


def test_node_a14b_pair_equals_the_a14b_sampler(smoke_models):
    """Wan 2.2 A14B on the multi-device node (the two experts in every worker, switching at boundary*1000 with a cfg
    each; 2 CPU workers) returns the latent of the single-process A14B sampler; experts of two variants are refused."""
    node_module, loaders, sampler = (pack_module(n) for n in ("parallel", "loaders", "sampler"))
    import folder_paths
    folder_paths.add_model_folder_path("diffusion_models", os.path.join(smoke_models, "diffusion_models"))
    high, low = (loaders.WanLeanModelLoader.execute(f"wan2.2_t2v_{n}_noise_14B_fp16.safetensors", "default")[0]
                 for n in ("high", "low"))
    g = torch.Generator().manual_seed(9)
    pos, neg = [[torch.randn(1, 6, 64, generator=g), {}]], [[torch.zeros(1, 3, 64), {}]]
    args = dict(seed=5, steps=4, shift=12.0, sampler="unipc", width=64, height=48, length=5)
    try:
        out = node_module.WanLeanParallelSampler.execute(
            high, pos, neg, cfg=4.0, devices="cpu:2", cfg_parallel=False, attention="auto", low_noise_model=low,
            cfg_low_noise=3.0, boundary=0.875, **args)[0]["samples"]
        other = loaders.WanLeanModelLoader.execute("wan2.2_i2v_low_noise_14B_fp16.safetensors", "default")[0]
        with pytest.raises(ValueError, match="low_noise_model is"):
            node_module.WanLeanParallelSampler.execute(high, pos, neg, cfg=4.0, devices="cpu:2", cfg_parallel=False,
                                                        attention="auto", low_noise_model=other, **args)
    finally:
        node_module.close_pool()
    ref = sampler.WanLeanSamplerA14B.execute(high, low, pos, neg, cfg_high_noise=4.0, cfg_low_noise=3.0,
                                              boundary=0.875, **args)[0]["samples"]
    scale_close(out, ref, rel=1e-5)
    high_only = sampler.WanLeanSampler.execute(high, pos, neg, cfg=4.0, **args)[0]["samples"]
    assert (high_only - ref).abs().max() > 1e-2 * ref.abs().max(), "the low-noise expert changed nothing"


def test_node_model_source(smoke_models, smoke_loras):
    """The workers' model: file, weight dtype and LoRAs from the handle (the pool key changes with each); a model
    without a source or a GGUF one is refused with a message naming the fix."""
    node_module, loaders, lora = (pack_module(n) for n in ("parallel", "loaders", "lora"))
    node_source = sys.modules["wanlean_pack.wan_core.model_source"]  # the classes the node knows
    from fixtures.variants import write_smoke_variants
    write_smoke_variants(smoke_models)  # the GGUF file refused below (whichever test runs first)
    import folder_paths
    for kind in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(kind, os.path.join(smoke_models, kind))
    model = loaders.WanLeanModelLoader.execute(T2V, "fp8_e4m3fn")[0]
    stacked = lora.WanLeanLoraLoader.execute(lora.WanLeanLoraLoader.execute(model, smoke_loras[0], 1.0)[0],
                                            smoke_loras[1], -0.5)[0]
    source = node_module.model_source(stacked)
    assert source.path.endswith(T2V) and source.weight_dtype == "float8_e4m3fn"
    assert [(os.path.basename(p), s) for p, s in source.loras] == [(smoke_loras[0], 1.0), (smoke_loras[1], -0.5)]
    keys = {node_source.DiTFiles.of({"model": node_module.model_source(m)}, torch.float32) for m in (model, stacked)}
    assert len(keys) == 2
    key = "blocks.0.self_attn.q.weight"
    sd = source.state_dict(torch.float32)  # fp8-rounded matrices, both LoRAs merged (in fp8), kept in fp8
    plain = node_source.ModelSource.of(source.path).state_dict(torch.float32)
    rounded = node_source.ModelSource.of(source.path, torch.float8_e4m3fn).state_dict(torch.float32)
    assert sd[key].dtype == rounded[key].dtype == torch.float8_e4m3fn and plain[key].dtype == torch.float32
    assert torch.equal(rounded[key].float(), plain[key].to(torch.float8_e4m3fn).float())
    assert not torch.equal(sd[key].float(), rounded[key].float())
    with pytest.raises(ValueError, match="no record of the file .* connect Wan Load Diffusion Model"):
        node_module.model_source(dataclasses.replace(model, extra={}))
    gguf = loaders.WanLeanModelLoader.execute("wan2.1-t2v-1.3b-Q8_0.gguf", "default")[0]
    with pytest.raises(ValueError, match="GGUF-quantised.*load a bf16/fp16/fp8 file"):
        node_module.model_source(gguf)


def test_layout_refusals_before_any_worker_starts():
    workers.check_layout(4, True, "ulysses", 12)  # 2 per pass divide 12 heads
    with pytest.raises(ValueError, match="cfg_parallel needs an even number of devices, got 3"):
        workers.check_layout(3, True, "auto", 12)
    with pytest.raises(ValueError, match=r"attention 'ulysses' needs the model's head count \(12\) .* \(8\)"):
        workers.check_layout(8, False, "ulysses", 12)
    workers.check_layout(8, False, "ring", 12)


FP8_FILES = [("wan2.1_t2v_1.3B_fp8_e4m3fn.safetensors", "default"), ("wan2.1_t2v_1.3B_fp8_e5m2.safetensors", "default"),
             ("wan2.1_t2v_1.3B_fp8_scaled.safetensors", "default"), (T2V, "fp8_e4m3fn")]


def _fp8_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 3, 8, 8, generator=g).to(dtype), torch.tensor([600.0]),
            torch.randn(1, 12, 64, generator=g).to(dtype))


@pytest.mark.parametrize("name,weight_dtype", FP8_FILES)
def test_worker_keeps_fp8_weights(smoke_models, name, weight_dtype):
    """A worker's model from an fp8 source (an fp8 file, scaled fp8, or the loader's fp8 weight dtype) keeps its
    matrices in fp8 and the rest as stored, cast at use as the single-device loader's model does through ComfyUI's
    ops (scaled fp8: packed with its scales, decoded at use by the same wan_core.quant code): half the bytes of the
    bf16 worker model it built before (smoke T2V-1.3B, measured: 2,242,176 bytes vs 4,454,016; scaled 2,258,664), and
    the loader's output exactly, in fp32 and in bf16 compute (before: fp16 norms/biases/modulation rounded to bf16,
    rel diff 4.6e-3)."""
    from wan_core.castops import parameter_bytes
    from fixtures.variants import write_smoke_variants
    loaders = pack_module("loaders")
    import folder_paths
    write_smoke_variants(smoke_models)
    folder_paths.add_model_folder_path("diffusion_models", os.path.join(smoke_models, "diffusion_models"))
    single = loaders.WanLeanModelLoader.execute(name, weight_dtype)[0].patcher.model
    source = model_source.ModelSource.of(folder_paths.get_full_path("diffusion_models", name),
                                     loaders.DIT_WEIGHT_DTYPES[weight_dtype])
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    bf16_before = model_source.DiTFiles.of({"m": os.path.join(smoke_models, "diffusion_models", T2V)},
                                       torch.bfloat16)(torch.device("cpu"))["m"]  # what the fp8 source became
    with torch.no_grad():  # bf16 compute, fp32 time embedding: runs (plain nn.Linear refused the mixed dtypes)
        assert torch.isfinite(bf16_before(*_fp8_inputs(torch.bfloat16))).all()
    for dtype in (torch.float32, torch.bfloat16):
        worker = model_source.DiTFiles.of({"m": source}, dtype)(torch.device("cpu"))["m"]
        q = worker.blocks[0].self_attn.q
        assert q.weight.dtype in fp8 and worker.blocks[1].ffn[2].weight.dtype in fp8
        assert {k: v.dtype for k, v in worker.state_dict().items()} == \
               {k: v.dtype for k, v in single.state_dict().items() if not k.endswith("scale_input")}
        assert ("scaled" in name) == (q.qtype == "float8_e4m3fn")  # scaled fp8: packed with its scale
        if dtype == torch.bfloat16:
            before, after = parameter_bytes(bf16_before), parameter_bytes(worker)
            print(f"\n{name} ({weight_dtype}): worker parameters {after:,} bytes vs {before:,} bf16 "
                  f"({after / before:.2f}x)")
            assert after < 0.6 * before
        with torch.no_grad():
            ours, ref = worker(*_fp8_inputs(dtype)), single(*_fp8_inputs(dtype))
        assert ours.dtype == dtype and torch.isfinite(ours).all() and ours.std() > 0
        assert torch.equal(ours, ref), f"{name} {dtype}: max abs diff {(ours - ref).abs().max():.3e}"


@pytest.mark.parametrize("name", ["wan2.1_t2v_1.3B_fp8_e4m3fn.safetensors", "wan2.1_t2v_1.3B_fp8_scaled.safetensors"])
def test_worker_lora_on_fp8(smoke_models, smoke_loras, name):
    """A LoRA on fp8 weights. Plain fp8 (e4m3fn): the workers merge it into the stored fp8 weights, as ComfyUI's
    ModelPatcher does when it loads the single-device model (which rounds stochastically, the workers to nearest: the
    two differ by fp8 rounding noise, far below what the LoRA changes; measured on the smoke LoRA (effect ~0.9 of the
    output): workers vs single-device 1.1e-1, vs the fp16 model with the LoRA the workers 7.5e-2, the single-device
    model 9.8e-2). Scaled fp8 (packed, wan_core.quant): both apply the LoRA at use to the decoded weight by the same
    function (nodes/lora.py's weight wrapper, wan_core.castops' patch): equal (measured 0; 5.1e-2 from fp16 + LoRA)."""
    from fixtures.variants import write_smoke_variants
    loaders, lora = pack_module("loaders"), pack_module("lora")
    import folder_paths
    write_smoke_variants(smoke_models)
    for kind in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(kind, os.path.join(smoke_models, kind))
    model = loaders.WanLeanModelLoader.execute(name, "default")[0]
    patched = lora.WanLeanLoraLoader.execute(model, smoke_loras[1], 0.8)[0].patcher
    try:
        with torch.no_grad():
            patched.patch_model()  # a full load: LoRA merged into the stored weights
            ref = patched.model(*_fp8_inputs(torch.float32))
            source = model_source.ModelSource.of(folder_paths.get_full_path("diffusion_models", name),
                                             loras=[(folder_paths.get_full_path("loras", smoke_loras[1]), 0.8)])
            worker = model_source.DiTFiles.of({"m": source}, torch.float32)(torch.device("cpu"))["m"]
            assert worker.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn
            ours = worker(*_fp8_inputs(torch.float32))
    finally:
        patched.unpatch_model()
    with torch.no_grad():
        plain = model.patcher.model(*_fp8_inputs(torch.float32))
        exact = model_source.DiTFiles.of({"m": dataclasses.replace(source, path=os.path.join(  # fp16 weights + LoRA
            smoke_models, "diffusion_models", T2V))}, torch.float32)(torch.device("cpu"))["m"](*_fp8_inputs(torch.float32))
    effect = ((plain - ref).abs().max() / ref.abs().max()).item()
    rel = scale_close(ours, ref, rel=0.2 * effect)
    err = [((o - exact).abs().max() / exact.abs().max()).item() for o in (ours, ref)]
    print(f"\n{name}: LoRA effect {effect:.2e}, workers vs single-device {rel:.2e}; vs fp16+LoRA: workers {err[0]:.2e}, "
          f"single-device {err[1]:.2e}")
    assert err[0] <= err[1], "rounding to nearest lands further from the fp16 model + LoRA than stochastic rounding"
