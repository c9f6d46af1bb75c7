"""The attention dispatch: SDPA matches plain softmax attention; backend choice, fallback and errors.
flash-attn / sageattention against SDPA on a CUDA device: tests/test_cuda.py."""
import types

import pytest
import torch

from wan_core import attention as att


def reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v per head, in float64; [B, L, H, D] -> [B, Lq, H*D]."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2).flatten(2)


def qkv(lq=37, lk=19, heads=3, dim=32, batch=2, seed=0, **to):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, lq, heads, dim, generator=g) * 2  # peaky softmax: wrong scaling would show
    k = torch.randn(batch, lk, heads, dim, generator=g)
    v = torch.randn(batch, lk, heads, dim, generator=g)
    return tuple(t.to(**to) for t in (q, k, v))


@pytest.fixture(autouse=True)
def restore_backend():
    saved = att.get_backend()
    yield
    att.set_backend(saved)


@pytest.mark.parametrize("lq, lk", [(37, 19), (16, 16)])
def test_sdpa_matches_reference(lq, lk):
    q, k, v = qkv(lq, lk)
    out = att.attention(q, k, v)
    assert out.shape == (2, lq, 3 * 32)
    assert (out.double() - reference(q, k, v)).abs().max() < 1e-5


def test_auto_is_sdpa_on_cpu():
    q, k, v = qkv()
    assert att.get_backend() == "auto"
    assert att.resolve(q) == "sdpa"
    assert torch.equal(att.attention(q, k, v), att.attention(q, k, v, backend="sdpa"))


def test_set_backend_returns_previous_and_validates():
    assert att.set_backend("sdpa") == "auto"
    assert att.get_backend() == "sdpa"
    assert att.set_backend("auto") == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'; choose one of auto, sdpa, flash, sage"):
        att.set_backend("xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        att.attention(*qkv(), backend="fast")


@pytest.mark.parametrize("name, package", [("flash", "flash-attn"), ("sage", "sageattention")])
def test_missing_kernel_is_a_clear_error(name, package, monkeypatch):
    monkeypatch.setitem(att._modules, name, None)  # as if not installed
    message = f"attention backend '{name}' is not installed here \\(pip install {package}\\)"
    with pytest.raises(ValueError, match=message):
        att.set_backend(name)
    assert name not in att.available_backends()


def _fake_kernels(monkeypatch, calls):
    """Importable stand-ins for both packages, recording their calls and answering with SDPA."""
    def flash_attn_func(q, k, v):
        calls.append("flash")
        return att._sdpa(q, k, v), None  # FA3-style (out, lse)

    def sageattn(q, k, v, tensor_layout, is_causal):
        assert tensor_layout == "NHD" and not is_causal
        calls.append("sage")
        return att._sdpa(q, k, v)

    monkeypatch.setitem(att._modules, "flash", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setitem(att._modules, "sage", types.SimpleNamespace(sageattn=sageattn))


def test_named_kernel_falls_back_to_sdpa_where_unsupported(monkeypatch):
    calls = []
    _fake_kernels(monkeypatch, calls)
    q, k, v = qkv()  # fp32 on CPU: neither kernel can run it
    expect = att.attention(q, k, v, backend="sdpa")
    for name in ("flash", "sage"):
        att.set_backend(name)
        with pytest.warns(UserWarning, match=f"attention backend '{name}' cannot run torch.float32 on cpu; using sdpa"):
            assert torch.equal(att.attention(q, k, v), expect)
    att.set_backend("auto")
    assert torch.equal(att.attention(q, k, v), expect)  # auto never warns, picks sdpa here
    assert calls == []


def test_dispatch_calls_the_kernel_where_supported(monkeypatch):
    calls = []
    _fake_kernels(monkeypatch, calls)
    monkeypatch.setitem(att._KERNELS, "flash", (att._flash, lambda q: True))
    monkeypatch.setitem(att._KERNELS, "sage", (att._sage, lambda q: True))
    monkeypatch.setattr(att, "_flash_ok", lambda q: True)
    q, k, v = qkv()
    expect = att.attention(q, k, v, backend="sdpa")
    assert torch.equal(att.attention(q, k, v), expect) and calls == ["flash"]  # auto prefers flash
    assert torch.equal(att.attention(q, k, v, backend="sage"), expect) and calls == ["flash", "sage"]
    att.set_backend("sdpa")
    att.attention(q, k, v)
    assert calls == ["flash", "sage"]


# ---- per-model backends: WanDiT.attention_backend, entered by the model's forward (wan_core.attention.use_backend)

def test_use_backend_overrides_the_default_and_restores(monkeypatch):
    calls = []
    _fake_kernels(monkeypatch, calls)
    monkeypatch.setitem(att._KERNELS, "flash", (att._flash, lambda q: True))  # as if q suited the kernel
    q = qkv()[0]
    assert att.resolve(q) == "sdpa"  # auto on the CPU
    with att.use_backend("flash"):
        assert att.resolve(q) == "flash"
        with att.use_backend(None):  # None: the process default
            assert att.resolve(q) == "sdpa"
            att.set_backend("flash")
            assert att.resolve(q) == "flash"
            att.set_backend("auto")
        assert att.resolve(q) == "flash" and att.resolve(q, "sdpa") == "sdpa"  # an explicit name wins
    assert att.resolve(q) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        with att.use_backend("fast"):
            pass
    assert att.resolve(q) == "sdpa"


def tiny_dit(backend=None, seed=0):
    from wan_core.dit import WanDiT
    from fixtures.smoke import randomize_
    model = randomize_(WanDiT(dim=256, ffn_dim=256, num_layers=2, text_dim=32, freq_dim=32), seed=seed).eval()
    model.attention_backend = backend
    return model


def dit_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([700.0]), torch.randn(1, 9, 32, generator=g)


@pytest.fixture
def picks(monkeypatch):
    """Fake flash / sage kernels that accept CPU fp32 (answering with SDPA); the list of (thread, backend) that
    `resolve` picked for every attention call."""
    import threading
    _fake_kernels(monkeypatch, [])
    for name in ("flash", "sage"):
        monkeypatch.setitem(att._KERNELS, name, (att._KERNELS[name][0], lambda q: True))
    out, resolve = [], att.resolve

    def recording(q, backend=None):
        name = resolve(q, backend)
        out.append((threading.get_ident(), name))
        return name

    monkeypatch.setattr(att, "resolve", recording)
    return out


def test_each_model_runs_its_own_backend(picks):
    """Two models with different backends in one process, called in turns, nested in another override, and next to a
    model left at the default: every attention call of a forward uses that model's backend; outputs unchanged."""
    flash, sage, default = tiny_dit("flash"), tiny_dit("sage"), tiny_dit()
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        ref = default(x, t, ctx)
        assert {n for _, n in picks} == {"sdpa"} and len(picks) == 4  # 2 blocks x (self + cross attention)
        for model, name in ((flash, "flash"), (sage, "sage"), (flash, "flash"), (default, "sdpa")):
            picks.clear()
            with att.use_backend("sage" if model is flash else "flash"):  # the model's own choice wins inside it
                out = model(x, t, ctx)
            # the fakes answer with SDPA, but the text's padding slots reach a kernel without a mask repeated, not
            # weighted (wan_core.attention._repeated_last): the same attention, rounded differently
            if name == "sdpa":
                assert torch.equal(out, ref)
            else:
                torch.testing.assert_close(out, ref, rtol=0, atol=5e-6)  # outputs of scale ~1
            assert [n for _, n in picks] == [name] * 4
        sdpa = tiny_dit("sdpa")
        assert torch.equal(sdpa(x, t, ctx), ref)  # the default (auto -> sdpa on the CPU): the same outputs as before


def test_backends_do_not_leak_between_threads(picks):
    """Two threads running models with different backends at the same time each see only their model's backend."""
    import threading
    models = {"flash": tiny_dit("flash"), "sage": tiny_dit("sage")}
    x, t, ctx = dit_inputs()
    barrier, seen, errors = threading.Barrier(2), {}, []

    def work(name):
        try:
            seen[name] = threading.get_ident()
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):
                    models[name](x, t, ctx)
        except Exception as e:  # reported below, never swallowed
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in models]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for name, ident in seen.items():
        assert {n for i, n in picks if i == ident} == {name}
    assert len(picks) == 2 * 3 * 4


def test_s2v_model_uses_its_backend_in_the_audio_injector_too(picks):
    from test_s2v import TINY, inputs
    from wan_core.s2v import WanS2V
    from fixtures.smoke import randomize_
    model = randomize_(WanS2V(**TINY), seed=1).eval()
    model.attention_backend = "sage"
    a = inputs()
    with torch.no_grad():
        model(**dict(a, context=a["context"][:, :7]))
    layers, injectors = TINY["num_layers"], len(TINY["audio_inject_layers"])
    assert [n for _, n in picks] == ["sage"] * (2 * layers + injectors)
