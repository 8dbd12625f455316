"""The bundle's own code: what MONAI lacks for a two-stage VQ-VAE + PixelCNN generative model.

Sub-packages follow the pipeline: ``data`` (discovery, phantoms, transforms), ``stage1_vqvae`` (the VQ-VAE and its
codebook), ``stage2_prior`` (the prior, its code cache and sampling), ``evaluation`` (metrics and their writers) and
``engine`` (checkpointing, guards, inferers and run records shared by both stages). Sub-modules are imported on
first attribute access, so a config can write ``@bundle.engine.checkpoint.latest_checkpoint``.
"""

from bundle.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
