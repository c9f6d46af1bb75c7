"""The official Wan 2.2 code (the `wan22` package, 2.2.11, installed with --no-deps by scripts/setup.sh) as a test
reference.

`official("modules.s2v.s2v_utils")` imports one module of it without running `wan/__init__.py` (which imports every
pipeline and their heavy dependencies): the parent packages are registered as bare modules pointing at the installed
folders. `cpu_patches()` makes the official model code run on the CPU: its flash-attention calls become an exact
SDPA and torch.cuda.current_device answers 0.
"""
import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch


@functools.lru_cache(maxsize=1)
def wan_root():
    spec = importlib.util.find_spec("wan")  # finds the folder without executing wan/__init__.py
    if spec is None or not spec.origin or not os.path.isfile(os.path.join(os.path.dirname(spec.origin), "speech2video.py")):
        pytest.fail("the official Wan code is missing: run `bash scripts/setup.sh` (it installs wan22==2.2.11)")
    return os.path.dirname(spec.origin)


PACKAGES = ("", "modules", "modules.s2v", "modules.animate", "utils", "distributed")  # never executed


def official(name):
    """The module wan.<name> of the installed official code (its package __init__ files not executed; imported
    with torch.cuda.current_device answering 0, which some of its default arguments call)."""
    root = wan_root()
    _import_diffusers()
    for pkg in PACKAGES:
        full = "wan" + ("." + pkg if pkg else "")
        if full not in sys.modules:
            module = types.ModuleType(full)
            module.__path__ = [os.path.join(root, *pkg.split(".")) if pkg else root]
            sys.modules[full] = module
    with cpu_patches():
        return importlib.import_module("wan." + name)


def _import_diffusers():
    """Import diffusers and transformers (the official model and scheduler classes derive from diffusers', which
    imports transformers) with any stand-in module for a package missing here (librosa, decord: a ModuleType without
    __spec__, see test_official.stub_video_modules) hidden: both probe optional packages with find_spec at import,
    which raises on a module without a spec."""
    stubs = {n: sys.modules.pop(n) for n in ("librosa", "decord") if n in sys.modules and sys.modules[n].__spec__ is None}
    try:
        for name in ("transformers", "diffusers.configuration_utils", "diffusers.models.modeling_utils",
                     "diffusers.schedulers.scheduling_utils"):
            importlib.import_module(name)
    finally:
        sys.modules.update(stubs)


def sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None, causal=False,
                   window_size=(-1, -1), deterministic=False, dtype=None, version=None, **_):
    """The official flash_attention([B, L, heads, d] q, k, v) computed exactly with SDPA in the inputs' dtype
    (fp32 in the tests); key padding from k_lens masked out, as the varlen kernel ignores it."""
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1], device=k.device)[None] < k_lens.to(k.device)[:, None])[:, None, None]
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask, is_causal=causal, scale=softmax_scale)
    out = out.transpose(1, 2)
    if q_lens is not None:  # rows past a sample's query length are padding: the kernel leaves them zero
        out = out * (torch.arange(q.shape[1], device=q.device)[None] < q_lens.to(q.device)[:, None])[..., None, None]
    return out.contiguous()


@contextlib.contextmanager
def cpu_patches(*modules):
    """Within the block: every given official module's flash_attention is sdpa_attention, and
    torch.cuda.current_device() returns 0 (the official code asks it for the device of its buffers)."""
    saved = [(m, getattr(m, "flash_attention")) for m in modules if hasattr(m, "flash_attention")]
    current = torch.cuda.current_device
    try:
        for m, _ in saved:
            m.flash_attention = sdpa_attention
        torch.cuda.current_device = lambda: 0
        yield
    finally:
        for m, f in saved:
            m.flash_attention = f
        torch.cuda.current_device = current


def official_sample(solver, steps, shift, model, x):
    """The official sampling loop (text2video / speech2video generate(), CFG left to `model`): the scheduler set up
    as there (unipc: FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift); dpm++:
    FlowDPMSolverMultistepScheduler(shift=1) with retrieve_timesteps(sigmas=get_sampling_sigmas(steps, shift))),
    then latents = scheduler.step(model(latents, t), t, latents) per timestep.
    Returns (final latents, timesteps, scheduler sigmas, the timesteps the model was shown)."""
    kwargs = dict(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    if solver == "unipc":
        scheduler = official("utils.fm_solvers_unipc").FlowUniPCMultistepScheduler(**kwargs)
        scheduler.set_timesteps(steps, device="cpu", shift=shift)
        timesteps = scheduler.timesteps
    elif solver == "dpm++":
        dpm = official("utils.fm_solvers")
        scheduler = dpm.FlowDPMSolverMultistepScheduler(**kwargs)
        timesteps, _ = dpm.retrieve_timesteps(scheduler, device="cpu", sigmas=dpm.get_sampling_sigmas(steps, shift))
    else:
        raise ValueError(f"the official code has no {solver!r} solver")
    generator = torch.Generator().manual_seed(0)
    latents, shown = x.clone(), []
    for t in timesteps:
        shown.append(int(t))
        v = model(latents, torch.stack([t]))
        latents = scheduler.step(v, t, latents, return_dict=False, generator=generator)[0]
    return latents, timesteps, scheduler.sigmas, shown


# the Wan2.2-S2V-14B transformer config (wan/configs/wan_s2v_14B.py) less its sizes
S2V_FLAGS = dict(enable_adain=True, adain_mode="attn_norm", zero_init=True, zero_timestep=True, enable_motioner=False,
                 add_last_motion=True, enable_tsm=False, enable_framepack=True, framepack_drop_mode="padd", cond_dim=16,
                 patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)


def official_s2v_model(**sizes):
    """The official WanModel_S2V built with the S2V-14B flags at the given sizes (dim, ffn_dim, num_heads,
    num_layers, freq_dim, text_dim, audio_dim, audio_inject_layers), fp32, eval."""
    module = official("modules.s2v.model_s2v")
    with cpu_patches():
        return module.WanModel_S2V(**S2V_FLAGS, **sizes).eval()


def run_official_s2v(model, x, t, context, ref_latent, motion_latent, pose_latent, audio, drop_motion=False):
    """One official S2V forward as speech2video.generate() makes it (batch 1): x [16, F, H, W], t [1], context
    [L, text_dim] (unpadded), ref_latent [1, 16, 1, H, W], motion_latent [1, 16, 19, H, W] (always given; clip 0 of the
    official loop drops it with drop_motion_frames), pose_latent [1, 16, F, H, W] (zeros without a pose video), audio
    [1, 25, C, 4F] (this clip's window); motion_frames [73, 19]. Returns [16, F, H, W]."""
    with torch.no_grad(), cpu_patches(official("modules.model"), official("modules.s2v.model_s2v")):
        out = model([x], t=t, context=[context], seq_len=None, ref_latents=ref_latent, motion_latents=motion_latent,
                     cond_states=pose_latent, audio_input=audio, motion_frames=[73, 19],
                     drop_motion_frames=drop_motion)
    return out[0]


class PinnedHiddenStates:
    """A transformers Wav2Vec2ForCTC whose output_hidden_states are those of transformers<=4.51.3, which the official
    code pins: [pos-conv output, layers 0..N-2, final LayerNorm(layer N-1)]. transformers 5 records the raw output of
    layer N-1 last instead; this wrapper puts `last_hidden_state` (the final LayerNorm's output) there."""

    def __init__(self, model):
        self.model = model
        self.device = model.device

    def __call__(self, input_values, output_hidden_states=False):
        out = self.model.wav2vec2(input_values, output_hidden_states=True)
        states = tuple(out.hidden_states[:-1]) + (out.last_hidden_state,)
        return types.SimpleNamespace(hidden_states=states)


def official_audio_encoder(model_dir):
    """The official wan.modules.s2v.audio_encoder.AudioEncoder loaded from a transformers folder (Wav2Vec2Processor +
    Wav2Vec2ForCTC, save_pretrained), its model wrapped in PinnedHiddenStates. librosa (not installed here) is
    replaced by a reader for what the tests give it, 16 kHz mono files: soundfile's float32 samples, which is what
    librosa.load(path, sr=16000) returns for them (resampling is tests/test_audio.py's business)."""
    added = "librosa" not in sys.modules
    if added:  # audio_encoder imports it at the top; the stand-in is left in sys.modules only while it does
        sys.modules["librosa"] = types.ModuleType("librosa")
    try:
        module = official("modules.s2v.audio_encoder")
    finally:
        if added:
            del sys.modules["librosa"]
    module.librosa = types.SimpleNamespace(load=_load_16k_mono)
    encoder = module.AudioEncoder(device="cpu", model_id=model_dir)
    encoder.model = PinnedHiddenStates(encoder.model.eval())
    return encoder


def _load_16k_mono(path, sr=22050):
    import soundfile
    data, rate = soundfile.read(path, dtype="float32")
    assert rate == sr == 16000 and data.ndim == 1, "the librosa stand-in reads 16 kHz mono files only"
    return data, rate
