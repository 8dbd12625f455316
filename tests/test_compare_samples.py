"""``scripts/compare_samples.py`` end to end: folders of samples against the same real test slices, beside real
training slices, their reconstructions and their real-top redraws, printed and written as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.data.phantom import write_hipmri_phantoms

from conftest import ROOT, save_untrained_models, write_sample_folder

sys.path.insert(0, str(ROOT / "scripts"))

import compare_samples  # noqa: E402

NUM = 10  # every test slice of the set below, so a folder of them holds exactly the real test set


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small phantom set, VQ-VAE-2 and prior checkpoints, and two sample folders: the real test slices and noise."""
    root = tmp_path_factory.mktemp("compare")
    write_hipmri_phantoms(root / "data", train_cases=2, val_cases=1, test_cases=2, slices_per_case=5)
    parser = compare_samples.inference_parser(str(root / "data"))
    save_untrained_models(parser, root)
    test, _ = compare_samples.real_slices(parser, "test", NUM, seed=5)
    noise = torch.rand(NUM, *test.shape[1:], generator=torch.Generator().manual_seed(1))
    copies, noise = write_sample_folder(root / "copies", test.flip(0)), write_sample_folder(root / "noise", noise)
    args = ["--samples", copies, noise, "--dataset_dir", str(root / "data"), "--ckpt_path", str(root / "model.pt")]
    args += ["--prior_path", str(root / "prior.pt")]
    return {"args": [*args, "--num", str(NUM)], "copies": copies, "noise": noise}


def test_real_copies_match_noise_does_not_and_every_reference_is_reported(
    setting: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    copies, noise, out = setting["copies"], setting["noise"], tmp_path / "comparison.json"
    assert compare_samples.main([*setting["args"], "--json", str(out)]) == 0

    record = json.loads(out.read_text())
    assert record["num"] == NUM and record["seed"] == 0 and list(record["results"]) == [copies, noise]
    same, unlike = record["results"][copies], record["results"][noise]
    assert same["precision"] == same["recall"] == 1.0  # the same points as the real test set
    assert unlike["precision"] == 0.0 and unlike["c2st_accuracy"] >= 0.8
    for key in ("c2st_accuracy", "precision", "recall", "density", "coverage"):
        for reference in ("_real_baseline", "_reconstruction_baseline", "_real_top_baseline"):
            assert same[key + reference] == unlike[key + reference], key + reference  # one reference for all
            assert 0.0 <= same[key + reference] <= (1.0 if key != "density" else float(NUM)), key + reference
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("real train vs real test (floor)")
    assert printed[2].startswith("reconstructed train vs real test")
    assert [float(v) for v in printed[2].split()[-5:]][1] == pytest.approx(
        same["precision_reconstruction_baseline"], abs=5e-4
    )
    assert printed[3].startswith("train's top codes, bottom prior's draws")
    assert printed[4].split()[0] == copies[-40:] and float(printed[4].split()[2]) == 1.0


def test_several_seeds_give_each_run_and_their_means(
    setting: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "comparison.json"
    assert compare_samples.main([*setting["args"], "--seed", "0", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["seeds"] == [0, 1] and list(record["per_seed"]) == ["0", "1"]
    for folder in (setting["copies"], setting["noise"]):
        runs = [record["per_seed"][seed][folder] for seed in ("0", "1")]
        for name in ("c2st_accuracy", "precision_real_baseline", "coverage_reconstruction_baseline"):
            assert record["results"][folder][name] == pytest.approx((runs[0][name] + runs[1][name]) / 2), name
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "comparison seed 0" and "comparison seed 1" in printed
    assert printed[-7] == "mean of 2 comparison seeds"  # then the header, three references and two folders
    assert float(printed[-1].split()[2]) == pytest.approx(record["results"][setting["noise"]]["precision"], abs=5e-4)


def test_an_overlay_builds_the_model_it_trained(setting: dict, tmp_path: Path) -> None:
    overlay = tmp_path / "wider.json"
    overlay.write_text(json.dumps({"embedding_dim": 16}))
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), str(overlay)])
    parser.update({"bundle_root": str(ROOT), "network_returns_loss": False})
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "overlay_model.pt")
    args = [*setting["args"], "--ckpt_path", str(tmp_path / "overlay_model.pt"), "--json", str(tmp_path / "out.json")]
    with pytest.raises(RuntimeError, match="overlay_model.pt' do not fit"):
        compare_samples.main(args)
    assert compare_samples.main([*args, "--overlay", str(overlay)]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["results"][setting["copies"]]["precision"] == 1.0


def test_without_a_prior_the_real_top_reference_is_left_out(setting: dict, tmp_path: Path) -> None:
    out = tmp_path / "comparison.json"
    assert compare_samples.main([*setting["args"], "--prior_path", "", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"][setting["copies"]]
    assert "precision_reconstruction_baseline" in results
    assert not any(key.endswith("_real_top_baseline") for key in results)
