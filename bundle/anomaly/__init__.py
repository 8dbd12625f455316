"""Unsupervised anomaly detection with the two-level VQ-VAE and its prior (Pinaya et al., MedIA 2022): per-code
likelihoods, healing of unlikely codes by resampling them from the prior, anomaly maps, a threshold calibrated on
normal slices, and a benchmark with synthetic lesions."""

from bundle.lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
