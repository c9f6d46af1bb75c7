"""The attention dispatch: SDPA matches plain softmax attention; backend choice, fallback and errors.
flash-attn / sageattention run only where importable on a CUDA device (skipped otherwise)."""
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


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name, tol", [("flash", 2e-2), ("sage", 5e-2)])
def test_kernels_match_sdpa_on_cuda(name, tol):
    if att._module(name) is None:
        pytest.skip(f"{name} kernel not installed")
    q, k, v = qkv(lq=1024, lk=512, heads=4, dim=128, batch=1, device="cuda", dtype=torch.bfloat16)
    assert att.resolve(q, name) == name
    out = att.attention(q, k, v, backend=name).float()
    ref = reference(q, k, v).float()
    assert (out - ref).abs().max() <= tol * ref.abs().max()
