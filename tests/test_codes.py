"""Stage-2 data: safe weight loading, the two-level code cache and its data set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import VQVAE

from bundle.engine.weights import load_weights
from bundle.stage2_prior.codes import CodeDataset, encode_dataset

from two_level_stand_in import TinyTwoLevelVQVAE


def _vqvae(num_embeddings: int = 16) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        num_res_layers=1,
        num_res_channels=(8, 8),
        downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings=num_embeddings,
        embedding_dim=4,
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


def test_encode_dataset_caches_both_levels_by_weights_and_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, ckpt, cache = TinyTwoLevelVQVAE().eval(), tmp_path / "model.pt", tmp_path / "codes" / "train.pt"
    torch.save(net.state_dict(), ckpt)
    data = _Images(5, labels=True)
    with pytest.raises(RuntimeError, match="eval mode"):
        encode_dataset(net.train(), data, cache, ckpt, "cpu")
    net.eval()
    first = encode_dataset(net, data, cache, ckpt, "cpu", batch_size=2)
    assert first["top"].shape == (5, 4, 2) and first["bottom"].shape == (5, 8, 4)
    assert first["top"].dtype == first["bottom"].dtype == torch.int16
    assert first["labels"].tolist() == [0, 1, 2, 0, 1] and first["files"][0] == "img_0.nii.gz"
    with torch.no_grad():
        top, bottom = net.index_quantize(data.images)
    assert torch.equal(first["top"].long(), top) and torch.equal(first["bottom"].long(), bottom)
    assert first["bottom"].unique().numel() > 1  # real codes, not a constant
    # the file round trip: what is on disk is what was returned
    on_disk = torch.load(cache, weights_only=True)
    assert (
        all(torch.equal(on_disk[k], first[k]) for k in ("top", "bottom", "labels")) and on_disk["key"] == first["key"]
    )
    mtime = cache.stat().st_mtime_ns
    again = encode_dataset(net, data, cache, ckpt, "cpu")
    assert cache.stat().st_mtime_ns == mtime and torch.equal(again["bottom"], first["bottom"])
    torch.save(TinyTwoLevelVQVAE().state_dict(), ckpt)  # other weights
    encode_dataset(net, data, cache, ckpt, "cpu")
    assert cache.stat().st_mtime_ns != mtime, "new weights must re-encode"
    mtime = cache.stat().st_mtime_ns
    encode_dataset(net, _Images(4, labels=True), cache, ckpt, "cpu")
    assert cache.stat().st_mtime_ns != mtime, "other files must re-encode"
    cache.write_bytes(b"truncated")
    assert encode_dataset(net, data, cache, ckpt, "cpu")["top"].shape == (5, 4, 2)
    # a cache of single-level codes from the same weights and files is re-encoded, not misread
    torch.save({"codes": first["bottom"], "labels": first["labels"], "files": first["files"], "key": "old"}, cache)
    assert encode_dataset(net, data, cache, ckpt, "cpu")["bottom"].shape == (5, 8, 4)


def test_encode_dataset_mirrored_copies_follow_the_originals_and_key_the_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, ckpt, cache = TinyTwoLevelVQVAE().eval(), tmp_path / "model.pt", tmp_path / "train.pt"
    torch.save(net.state_dict(), ckpt)
    data = _Images(5, labels=True)
    plain = encode_dataset(net, data, cache, ckpt, "cpu", batch_size=2)
    for axis in (0, 1):
        mirrored = encode_dataset(net, data, cache, ckpt, "cpu", batch_size=2, mirror_axis=axis)
        assert mirrored["key"] != plain["key"], "a mirrored cache must not pass for a plain one"
        with torch.no_grad():
            top, bottom = net.index_quantize(data.images.flip(2 + axis))
        assert torch.equal(mirrored["top"][:5], plain["top"]) and torch.equal(mirrored["bottom"][:5], plain["bottom"])
        assert torch.equal(mirrored["top"][5:].long(), top) and torch.equal(mirrored["bottom"][5:].long(), bottom)
        assert not torch.equal(mirrored["bottom"][5:], mirrored["bottom"][:5])  # really mirrored
        assert mirrored["labels"].tolist() == [0, 1, 2, 0, 1] * 2 and len(mirrored["files"]) == 10
        assert len(CodeDataset(mirrored)) == 10
    assert torch.equal(encode_dataset(net, data, cache, ckpt, "cpu")["top"], plain["top"])  # back to plain: re-encoded
    for bad in (2, True, "0"):
        with pytest.raises(ValueError, match="mirror_axis must be null, 0 or 1"):
            encode_dataset(net, data, cache, ckpt, "cpu", mirror_axis=bad)


def test_code_dataset() -> None:
    encoded = {
        "top": torch.randint(0, 6, (4, 4, 2), dtype=torch.int16),
        "bottom": torch.randint(0, 10, (4, 8, 4), dtype=torch.int16),
        "labels": torch.tensor([0, 1, 2, 0]),
    }
    dataset = CodeDataset(encoded)
    assert len(dataset) == 4
    item = dataset[2]
    assert item["top"].dtype == item["bottom"].dtype == torch.int64
    assert torch.equal(item["top"], encoded["top"][2].long()) and torch.equal(
        item["bottom"], encoded["bottom"][2].long()
    )
    assert item["label"] == 2
    unlabelled = CodeDataset(encoded | {"labels": torch.zeros(0, dtype=torch.long)})
    assert sorted(unlabelled[0]) == ["bottom", "top"]
    with pytest.raises(ValueError, match="same number"):
        CodeDataset(encoded | {"bottom": encoded["bottom"][:3]})


def test_code_dataset_keeps_only_its_indices() -> None:
    """A distributed rank's shard: only those items, in that order, with their files."""
    encoded = {
        "top": torch.arange(5, dtype=torch.int16).view(5, 1, 1).expand(5, 4, 2).clone(),
        "bottom": torch.arange(5, dtype=torch.int16).view(5, 1, 1).expand(5, 8, 4).clone(),
        "labels": torch.tensor([0, 1, 2, 0, 1]),
        "files": [f"f{i}.nii.gz" for i in range(5)],
    }
    shard = CodeDataset(encoded, indices=[3, 0, 4])
    assert len(shard) == 3 and shard.files == ["f3.nii.gz", "f0.nii.gz", "f4.nii.gz"]
    assert [int(shard[i]["top"][0, 0]) for i in range(3)] == [3, 0, 4]
    assert [int(shard[i]["label"]) for i in range(3)] == [0, 0, 1]
    assert CodeDataset(encoded).files == encoded["files"]
