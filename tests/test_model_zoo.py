"""The MONAI Model Zoo's checks, offline: metadata, ``verify_net_in_out``, TorchScript export of the networks.

The Model Zoo validates ``configs/metadata.json`` against a JSON schema it downloads; here the schema's required
keys (see the project notes) are checked locally instead. TorchScript is exported with MONAI's own
``ckpt_export`` from tiny, randomly initialised weights (a data-initialised codebook, so that many codes are used)
and reloaded; its outputs must match the eager network's.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import ROOT, TINY_NETWORK, TINY_PRIOR

REQUIRED_METADATA = [
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
]
ZOO_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
CONFIGS = {
    "train": ["inference.json", "train_vqvae.json", "train_prior.json"],
    "infer": ["inference.json"],
    "eval": ["inference.json", "evaluate.json"],
}
REQUIRED_TENSOR = [
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
]
# ckpt_export checks: max |TorchScript - eager| per exported network, written for the report (pytest -s shows it).
TOLERANCE = 1e-5


def _metadata() -> dict:
    return json.loads((ROOT / "configs" / "metadata.json").read_text())


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _monai_bundle(*args: str, timeout: int = 300, cwd=ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", *map(str, args)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def _tiny_parser(*overrides: str) -> ConfigParser:
    """configs/inference.json with the same size overrides the CLI calls get, parsed as Python literals like the CLI."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    args = [*TINY_NETWORK, *TINY_PRIOR, *overrides]
    for key, value in zip(args[::2], args[1::2]):
        parser[key.lstrip("-")] = ast.literal_eval(value)
    return parser


# ----------------------------------------------------------------------------------------------- metadata


def test_metadata_has_the_keys_the_schema_requires() -> None:
    meta = _metadata()
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    assert not missing, f"configs/metadata.json lacks {missing}"
    for key in ("task", "description", "authors", "copyright"):
        assert isinstance(meta[key], str) and meta[key].strip(), key
    for key in ("monai_version", "pytorch_version", "numpy_version"):
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", meta[key]), f"{key}: {meta[key]!r}"
    assert isinstance(meta["required_packages_version"], dict) and "optional_packages_version" not in meta
    assert meta["schema"] == ZOO_SCHEMA
    fmt = meta["network_data_format"]
    assert fmt.get("inputs") and fmt.get("outputs")
    for kind in ("inputs", "outputs"):
        for name, tensor in fmt[kind].items():
            missing = [key for key in REQUIRED_TENSOR if key not in tensor]
            assert not missing, f"network_data_format.{kind}.{name} lacks {missing}"
            assert tensor["num_channels"] == len(tensor["channel_def"]), f"{kind}.{name}"
            assert len(tensor["value_range"]) == 2 and tensor["value_range"][0] < tensor["value_range"][1]
    image = next(iter(fmt["inputs"].values()))
    assert image["spatial_shape"] == [256, 128] and image["num_channels"] == 1 and image["dtype"] == "float32"


def test_metadata_versions_match_the_tested_environment() -> None:
    import monai
    import numpy

    meta = _metadata()
    assert meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert meta["numpy_version"] == numpy.__version__


def test_version_is_the_latest_changelog_entry_and_root_metadata_links_to_it() -> None:
    meta = _metadata()
    assert meta["version"] in meta["changelog"]
    assert _version(meta["version"]) == max(_version(v) for v in meta["changelog"])
    assert next(iter(meta["changelog"])) == meta["version"], "newest changelog entry first (Model Zoo convention)"
    root = ROOT / "metadata.json"
    assert root.is_symlink() and root.resolve() == (ROOT / "configs" / "metadata.json").resolve()


def test_bundle_files_the_model_zoo_expects() -> None:
    for path in ("LICENSE", "docs/README.md", "docs/data_license.txt", "configs/logging.conf", "large_files.yml"):
        assert (ROOT / path).is_file(), path
    config_names = {name for files in CONFIGS.values() for name in files} | {"multi_gpu_train.json", "sample.json"}
    for config_name in config_names:
        assert (ROOT / "configs" / config_name).is_file(), config_name


def test_large_files_lists_only_downloadable_entries() -> None:
    """``verify_bundle`` downloads every entry: until weights are published the list is empty, never a blank url."""
    from monai.bundle import ConfigParser

    entries = ConfigParser.load_config_file(str(ROOT / "large_files.yml"))["large_files"]
    for entry in entries:
        assert {"path", "url", "hash_val", "hash_type"} <= set(entry), entry
        assert entry["url"].startswith("https://") and entry["hash_val"] and entry["hash_type"] == "md5", entry


def test_metadata_reads_back_as_written() -> None:
    """MONAI's ``read_meta`` renames ``optional_packages_version``; every key must survive the round trip."""
    parser = ConfigParser()
    parser.read_meta(str(ROOT / "configs" / "metadata.json"))
    assert parser.get("_meta_") == _metadata()


# ----------------------------------------------------------------------------------------------- properties


def test_zoo_properties_hold_from_another_directory(phantom_dir, tmp_path) -> None:
    """``ConfigWorkflow(...).check_properties()`` as the zoo runs it, for each workflow type: from another working
    directory, bundle_root set (one process for the three, to save two start-ups)."""
    code = (
        "from monai.bundle import ConfigWorkflow\n"
        f"root = {str(ROOT)!r}\n"
        f"for workflow_type, names in {CONFIGS!r}.items():\n"
        "    workflow = ConfigWorkflow(workflow_type=workflow_type, "
        "config_file=[root + '/configs/' + name for name in names], "
        "meta_file=root + '/configs/metadata.json', logging_file=root + '/configs/logging.conf', "
        f"bundle_root=root, dataset_dir={str(phantom_dir)!r}, output_dir={str(tmp_path / 'out')!r}, "
        f"ckpt_dir={str(tmp_path / 'models')!r})\n"
        "    workflow.initialize()\n"
        "    print('MISSING', workflow_type, workflow.check_properties())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    log = result.stdout[-3000:] + result.stderr[-5000:]
    assert result.returncode == 0, log
    for workflow_type in CONFIGS:
        assert f"MISSING {workflow_type} []" in result.stdout, log


def test_verify_net_in_out() -> None:
    result = _monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--device",
        "cpu",
    )
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------- TorchScript


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny VQ-VAE-2 and prior weights, saved like training saves them (plain state dicts)."""
    from bundle.stage1_vqvae.codebook import find_quantizers, init_codebook

    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    parser = _tiny_parser()
    vqvae = parser.get_parsed_content("network_def", lazy=False)
    with torch.no_grad():  # codes from data, as CodebookMonitor does, so the decoder sees many different codes
        images, generator = torch.rand(4, 1, 256, 128), torch.Generator().manual_seed(0)
        top_encodings, bottom_features = vqvae.encode(images)
        init_codebook(find_quantizers(vqvae)["top"], top_encodings, generator)
        top_quantized = vqvae.quantize_top(top_encodings)[0]
        bottom_encodings = vqvae.bottom_projection(torch.cat([bottom_features, vqvae.top_decoder(top_quantized)], 1))
        init_codebook(find_quantizers(vqvae)["bottom"], bottom_encodings, generator)
    prior = parser.get_parsed_content("prior_def", lazy=False)
    torch.save(vqvae.state_dict(), tmp / "model.pt")
    torch.save(prior.state_dict(), tmp / "prior.pt")
    return {"tmp": tmp, "vqvae": vqvae.eval(), "prior": prior.eval()}


def _export(tiny_weights: dict, net_id: str, name: str, ckpt: str, *args: str) -> torch.jit.ScriptModule:
    """``ckpt_export`` as the Model Zoo runs it, from another working directory; scripted unless ``args`` trace."""
    tmp = tiny_weights["tmp"]
    _monai_bundle(
        "ckpt_export",
        net_id,
        "--filepath",
        tmp / name,
        "--ckpt_file",
        tmp / ckpt,
        "--bundle_root",
        ROOT,
        "--meta_file",
        ROOT / "configs/metadata.json",
        "--config_file",
        ROOT / "configs/inference.json",
        *TINY_NETWORK,
        *TINY_PRIOR,
        *args,
        cwd=tmp,
    )
    extra = {"metadata.json": "", "inference.json": ""}
    module = torch.jit.load(str(tmp / name), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == _metadata()["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    return module.eval()


def _report(name: str, difference: float) -> None:
    print(f"\nTorchScript {name}: max |TorchScript - eager| = {difference:.3g}")


def test_ckpt_export_scripts_the_reconstruction_network(tiny_weights: dict) -> None:
    """The zoo scripts ``network_def`` (no ``--use_trace``): the VQ-VAE-2 must script, and match eager."""
    module = _export(tiny_weights, "network_def", "model.ts", "model.pt")
    assert "if " in module.code, "traced, not scripted: the exported forward has no control flow"
    images = torch.rand(3, 1, 256, 128)
    with torch.no_grad():
        eager = tiny_weights["vqvae"](images)
        before = module.state_dict()["bottom_quantizer.embedding.weight"].clone()
        exported = module(images)
        assert torch.equal(module(images), exported), "the exported network is not deterministic"
    assert exported.shape == (3, 1, 256, 128) and exported.dtype == torch.float32
    assert torch.equal(module.state_dict()["bottom_quantizer.embedding.weight"], before), "eval mode updated the EMA"
    difference = (exported - eager).abs().max().item()
    _report("reconstruction (network_def, scripted)", difference)
    assert difference <= TOLERANCE


def test_ckpt_export_decoder_for_sampling(tiny_weights: dict) -> None:
    module = _export(
        tiny_weights,
        "network_def",
        "decoder.ts",
        "model.pt",
        "--network_def#_target_",
        "bundle.stage1_vqvae.export.VQVAE2Decoder",
    )
    encoding = ("bottom_encoder.", "top_encoder.", "top_decoder.", "bottom_projection.")
    assert not any(k.startswith(encoding) for k in module.state_dict()), "the decoder export carries the encoder"
    generator = torch.Generator().manual_seed(1)
    top, bottom = torch.randint(0, 64, (3, 16, 8), generator=generator), torch.randint(
        0, 64, (3, 64, 32), generator=generator
    )
    vqvae = tiny_weights["vqvae"]
    with torch.no_grad():
        eager = vqvae.decode_samples(top, bottom)
        exported = module(top, bottom)
        other = module(top, torch.roll(bottom, 1, dims=1))
    assert exported.shape == (3, 1, 256, 128)
    assert not torch.equal(exported, other), "the bottom codes do not reach the output"
    difference = (exported - eager).abs().max().item()
    _report("decoder (VQVAE2Decoder, int64 codes [B, 16, 8] and [B, 64, 32])", difference)
    assert difference <= TOLERANCE


def test_ckpt_export_top_prior(tiny_weights: dict) -> None:
    module = _export(
        tiny_weights,
        "prior_def",
        "prior_top.ts",
        "prior.pt",
        "--use_trace",
        "True",
        "--input_shape",
        "[1, 16, 8]",
        "--prior_def#_target_",
        "bundle.stage2_prior.export.TopPriorLogits",
    )
    codes = torch.randint(0, 64, (3, 16, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = tiny_weights["prior"].top(codes)
        exported = module(codes)
    assert exported.shape == (3, 64, 16, 8)
    difference = (exported - eager).abs().max().item()
    _report("top prior logits (TopPriorLogits, traced)", difference)
    assert difference <= TOLERANCE


def test_bottom_prior_traces_with_the_top_codes(tiny_weights: dict) -> None:
    """ckpt_export traces with a single input; the bottom prior needs (bottom, top): trace it directly."""
    from bundle.stage2_prior.export import BottomPriorLogits

    prior = tiny_weights["prior"]
    parser = _tiny_parser()
    parser["prior_def::_target_"] = "bundle.stage2_prior.export.BottomPriorLogits"
    module = parser.get_parsed_content("prior_def", lazy=False).eval()
    assert isinstance(module, BottomPriorLogits)
    module.load_state_dict(prior.state_dict())
    generator = torch.Generator().manual_seed(3)
    top, bottom = torch.randint(0, 64, (2, 16, 8), generator=generator), torch.randint(
        0, 64, (2, 64, 32), generator=generator
    )
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):  # the range checks are baked out of the graph
        traced = torch.jit.trace(module, (bottom, top))
    with torch.no_grad():
        other_top = torch.roll(top, 1, dims=1)
        assert (traced(bottom, other_top) - prior.bottom(bottom, None, other_top)).abs().max().item() <= TOLERANCE
        assert not torch.allclose(traced(bottom, other_top), traced(bottom, top)), "the top codes are ignored"


def test_exported_decoder_does_not_load_mismatched_weights(tiny_weights: dict) -> None:
    from bundle.stage1_vqvae.export import VQVAE2Decoder

    parser = _tiny_parser("--num_embeddings", "32")
    parser["network_def::_target_"] = "bundle.stage1_vqvae.export.VQVAE2Decoder"
    decoder = parser.get_parsed_content("network_def", lazy=False)
    assert isinstance(decoder, VQVAE2Decoder)
    with pytest.raises(RuntimeError, match="size mismatch"):
        decoder.load_state_dict(torch.load(tiny_weights["tmp"] / "model.pt", weights_only=True), strict=True)
