"""The VQ-VAE subclass: shapes, outputs, weights compatible with MONAI's, fp32 quantisation under autocast."""

from __future__ import annotations

import torch
from conftest import ROOT
from monai.bundle import ConfigParser
from monai.networks import nets

from bundle.stage1_vqvae.vqvae import VQVAE


def _network_args() -> dict:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    keys = [k for k in parser["network_def"] if k not in ("_target_", "return_loss")]
    return {k: parser.get_parsed_content(f"network_def::{k}") for k in keys}


def test_default_latent_is_64x32_and_outputs() -> None:
    torch.manual_seed(0)
    args = _network_args()
    net = VQVAE(return_loss=True, **args).eval()
    x = torch.rand(2, 1, 256, 128)
    with torch.no_grad():
        recon, qloss = net(x)
        codes = net.index_quantize(x)
    assert recon.shape == x.shape and qloss.ndim == 0 and torch.isfinite(qloss)
    assert codes.shape == (2, 64, 32) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < args["num_embeddings"]
    assert net.decode_samples(codes).shape == x.shape
    net.return_loss = False
    with torch.no_grad():
        assert torch.equal(net(x), recon)


def test_state_dict_matches_monai_vqvae() -> None:
    args = _network_args()
    ours, theirs = VQVAE(**args), nets.VQVAE(**args)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_quantisation_stays_fp32_under_cpu_bf16_autocast() -> None:
    torch.manual_seed(0)
    net = VQVAE(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        num_res_layers=1,
        num_res_channels=(8, 8),
        downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings=512,
        embedding_dim=8,
    ).eval()
    # Codes packed closely, so bf16 distances would tie or swap.
    net.quantizer.quantizer.embedding.weight.data = 1.0 + 1e-3 * torch.randn(512, 8)
    encodings = 1.0 + 1e-3 * torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        reference = net.quantizer.quantize(encodings)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            quantized, _ = net.quantize(encodings)
            raw = net.quantizer.quantize(encodings)  # MONAI's path, no fp32 guard
    expected = net.quantizer.embed(reference)
    assert torch.equal(quantized, expected)
    assert not torch.equal(raw, reference), "bf16 distances should have changed some codes (test premise)"
