"""wan_core: the Wan video models in plain PyTorch (DiT, VAE, umT5, samplers); never imports ComfyUI."""
