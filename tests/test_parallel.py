"""Sequence-parallel (Ulysses / all-gather KV), CFG-parallel and combined runs over gloo with 2 and 4 processes
equal the single-process output on identical random weights (t2v, per-token t, i2v, S2V; token counts that do
not divide the world size), and the worker pool ends every worker on a crash or an interrupt."""
import os

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import scale_close
from wan_core import parallel
from wan_core.dit import WanDiT
from wan_core.pipeline import Cond, Expert, generate
from wan_core.s2v import WanS2V
from wan_core.smoke import randomize_

TEXT = 32


def _models():
    """Tiny models: 2 heads (dim 256: Ulysses on 2 ranks, all-gather KV on 4) and 4 heads (Ulysses on 4)."""
    torch.manual_seed(0)
    return {
        "t2v": randomize_(WanDiT(dim=256, ffn_dim=64, num_layers=2, text_dim=TEXT, freq_dim=32), seed=1),
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


LAYOUTS = {2: [("sp", False, "auto"), ("sp_allgather", False, "allgather"), ("cfg", True, "auto")],
           4: [("sp", False, "auto"), ("cfg_sp", True, "auto")]}


def _forward_worker(rank, world, init, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    models, inputs = _models(), _inputs()
    results = {}
    with torch.no_grad():
        for layout, cfg, mode in LAYOUTS[world]:
            mesh = parallel.make_mesh(cfg_parallel=cfg, attention_mode=mode)
            for name, (m, a, kw) in inputs.items():
                results[f"{layout}/{name}"] = parallel.ParallelDiT(models[m], mesh)(*a, **kw)
            results[f"{layout}/sample"] = _sample(parallel.ParallelDiT(models["t2v"], mesh))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_equals_single_process(world, reference, tmp_path):
    mp.spawn(_forward_worker, args=(world, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert len(ranks[0]) == len(LAYOUTS[world]) * len(reference)
    for key, out in ranks[0].items():
        ref = reference[key.split("/")[1]]
        assert out.shape == ref.shape, key
        scale_close(out, ref, rel=1e-5)
        for other in ranks[1:]:  # every rank returns the same tensor (the samplers stay in step)
            assert torch.equal(other[key], out), key


def test_ulysses_refuses_indivisible_heads():
    sp = parallel.SequenceParallel.__new__(parallel.SequenceParallel)
    sp.mode, sp.size = "ulysses", 4
    with pytest.raises(ValueError, match="head count"):
        sp.attention(*(torch.zeros(1, 8, 2, 128) for _ in range(3)))


def test_parse_devices():
    assert parallel.parse_devices("cpu:2") == ["cpu", "cpu"]
    assert parallel.parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    for bad in ("cuda:0", "gpu0,gpu1"):
        with pytest.raises(ValueError, match="devices"):
            parallel.parse_devices(bad)


# ----------------------------------------------------------------------------- the worker pool

def _tiny_factory(device):
    return {}


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


class _Interrupt(Exception):
    pass


def test_node_pool_parity_reuse_crash_and_interrupt(smoke_models):
    """The multi-device node (2 CPU workers, CFG-parallel) returns the single-process latent and reuses its pool;
    a worker crash, and separately an interrupt seen by the caller, end every worker; the caller goes on."""
    from test_lora import pack_module
    node_module = pack_module("parallel")
    import folder_paths
    from wan_core.checkpoint import load_dit
    folder_paths.add_model_folder_path("diffusion_models", os.path.join(smoke_models, "diffusion_models"))
    name = "wan2.1_t2v_1.3B_fp16.safetensors"
    g = torch.Generator().manual_seed(8)
    pos, neg = [[torch.randn(1, 6, 64, generator=g), {}]], [[torch.zeros(1, 3, 64), {}]]
    args = dict(seed=3, steps=2, cfg=4.0, shift=5.0, sampler="unipc", width=64, height=48, length=5)
    node = node_module.WanLeanParallelSampler()
    try:
        out = node.sample(name, pos, neg, devices="cpu:2", cfg_parallel=True, attention="auto", **args)[0]["samples"]
        pool = node_module._POOL["pool"]
        again = node.sample(name, pos, neg, devices="cpu:2", cfg_parallel=True, attention="auto", **args)[0]["samples"]
        assert node_module._POOL["pool"] is pool and torch.equal(out, again)
        pids = [p.pid for p in pool.procs]
        assert pool.run(_steps_job, 3) in pids
        with pytest.raises(RuntimeError, match="parallel worker .* all workers were stopped"):
            pool.run(_steps_job, 10 ** 9, 1)  # worker 1 dies at step 2
        assert not pool.alive and _gone(pids)
    finally:
        node_module.close_pool()
    _interrupt_ends_every_worker()
    model = WanDiT.from_state_dict(load_dit(os.path.join(smoke_models, "diffusion_models", name), torch.float32).sd)
    ref = generate([Expert(lambda: model, 4.0)], Cond(pos[0][0]), Cond(neg[0][0]), channels=16,
                   **{k: v for k, v in args.items() if k != "cfg"})
    scale_close(out, ref, rel=1e-5)


def _interrupt_ends_every_worker():
    pool = parallel.WorkerPool(_tiny_factory, ["cpu", "cpu"])
    pids, calls = [p.pid for p in pool.procs], []

    def poll():  # ComfyUI's interrupt check, raising on the third look
        calls.append(1)
        if len(calls) >= 3:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        pool.run(_steps_job, 10 ** 9, poll=poll)
    assert not pool.alive and _gone(pids)
