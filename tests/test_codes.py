"""Stage-2 data: safe weight loading, the code cache and the prior's batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bundle.stage2_prior.codes import CodeDataset, encode_dataset, prepare_code_batch
from bundle.engine.weights import load_weights
from bundle.stage1_vqvae.vqvae import VQVAE


def _vqvae(num_embeddings: int = 16) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8), num_res_layers=1, num_res_channels=(8, 8),
        downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)), upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings=num_embeddings, embedding_dim=4,
    )


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, labels: bool = False) -> None:
        self.data = [{"image": f"img_{i}.nii.gz"} for i in range(n)]
        self.images = torch.rand(n, 1, 32, 16, generator=torch.Generator().manual_seed(1))
        self.labels = labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i]}
        if self.labels:
            item["label"] = i % 3
        return item


def test_load_weights_is_strict_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"model": _vqvae(16).state_dict()}, path)
    net = load_weights(_vqvae(16), path, "cpu")
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    with pytest.raises(RuntimeError, match=r"model\.pt.*num_embeddings"):
        load_weights(_vqvae(32), path, "cpu")
    with pytest.raises(FileNotFoundError, match="run training first"):
        load_weights(_vqvae(16), tmp_path / "missing.pt", "cpu")


def test_encode_dataset_caches_by_weights_and_files(tmp_path: Path, caplog) -> None:
    net, ckpt, cache = _vqvae().eval(), tmp_path / "model.pt", tmp_path / "codes" / "train.pt"
    torch.save(net.state_dict(), ckpt)
    data = _Images(5, labels=True)
    with pytest.raises(RuntimeError, match="eval mode"):
        encode_dataset(net.train(), data, cache, ckpt, "cpu")
    net.eval()
    first = encode_dataset(net, data, cache, ckpt, "cpu", batch_size=2)
    assert first["codes"].shape == (5, 8, 4) and first["codes"].dtype == torch.int16
    assert first["labels"].tolist() == [0, 1, 2, 0, 1] and first["files"][0] == "img_0.nii.gz"
    with torch.no_grad():
        assert torch.equal(first["codes"].long(), net.index_quantize(data.images))
    mtime = cache.stat().st_mtime_ns
    again = encode_dataset(net, data, cache, ckpt, "cpu")
    assert cache.stat().st_mtime_ns == mtime and torch.equal(again["codes"], first["codes"])
    torch.save(_vqvae(16).state_dict() | {"decoder.blocks.0.weight": torch.zeros(1)}, ckpt)  # other weights
    encode_dataset(net, data, cache, ckpt, "cpu")
    assert cache.stat().st_mtime_ns != mtime, "new weights must re-encode"
    cache.write_bytes(b"truncated")
    assert encode_dataset(net, data, cache, ckpt, "cpu")["codes"].shape == (5, 8, 4)


def test_code_dataset_and_prepare_batch() -> None:
    encoded = {"codes": torch.randint(0, 16, (4, 8, 4), dtype=torch.int16), "labels": torch.tensor([0, 1, 2, 0])}
    dataset = CodeDataset(encoded)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    inputs, targets, args, kwargs = prepare_code_batch(batch, "cpu")
    assert inputs.dtype == torch.int64 and inputs.shape == (4, 8, 4) and torch.equal(inputs, targets)
    assert args == () and kwargs["labels"].tolist() == [0, 1, 2, 0]
    unlabelled = CodeDataset({"codes": encoded["codes"], "labels": torch.zeros(0, dtype=torch.long)})
    assert len(prepare_code_batch(torch.utils.data.default_collate([unlabelled[0]]), "cpu")) == 2
