"""Load: the data order after a resume, memory over many iterations, and a large data set cached partially."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import soak  # noqa: E402

pytestmark = pytest.mark.slow


def test_training_order_depends_only_on_seed_and_epoch(phantom_dir: Path, tmp_path: Path) -> None:
    # A resumed run builds a new sampler; MONAI's engine calls set_epoch, so epoch e has the same order
    # whether or not epochs before it ran in this process.
    orders = []
    for consumed in (0, 3):
        parser = soak.parser_for({"dataset_dir": str(phantom_dir), "output_dir": str(tmp_path), "cache_rate": 0.0})
        sampler = parser.get_parsed_content("train::sampler")
        for epoch in range(1, consumed + 1):
            sampler.set_epoch(epoch)
            list(sampler)
        sampler.set_epoch(4)
        orders.append(list(sampler))
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(18))
    sampler.set_epoch(5)
    assert list(sampler) != orders[0]


def test_resident_memory_does_not_grow(tmp_path: Path) -> None:
    cwd = os.getcwd()
    try:
        report = soak.soak(tmp_path, iterations=120, every=15, tiny=True)
    finally:
        os.chdir(cwd)
    assert report["iterations"] == 120
    assert report["rss_growth_after_warmup_mib"] < 30, report["rss_mib_samples"]


def test_large_data_set_is_cached_only_as_asked(tmp_path: Path) -> None:
    cwd = os.getcwd()
    try:
        report = soak.scale(tmp_path, slices=600, cache_rate=0.1)
    finally:
        os.chdir(cwd)
    assert report["slices"] == 600 and report["cached_items"] == 60
