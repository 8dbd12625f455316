"""Print the demo's headline figures from ``<output_dir>/reconstruction_metrics.json`` and ``generation_metrics.json``.

Each generation figure is printed beside the same figure for real training slices against real test slices. A line
before them gives the epochs each stage trained (from the names of its resumable checkpoints), so a stage that its
time budget stopped early shows.
Usage: ``python scripts/print_results.py outputs``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.engine.checkpoint import numbered_checkpoints  # noqa: E402


def summary(output_dir: str | Path) -> list[str]:
    """The lines to print; a missing metrics file is one line that names it and the workflow that writes it.

    Args:
        output_dir: the workflows' ``output_dir``.

    Returns:
        Human-readable lines, one figure each.
    """
    lines = trained_epochs_lines(output_dir)
    for name, (config, lines_of) in REPORTS.items():
        path = Path(output_dir) / name
        if path.is_file():
            lines += lines_of(json.loads(path.read_text()))
        else:
            lines.append(f"No {path}: the 'evaluating' run with {config} writes it")
    return lines


def trained_epochs_lines(output_dir: str | Path) -> list[str]:
    """``Epochs trained: stage 1 20, stage 2 12`` from ``<output_dir>/checkpoints``; nothing without checkpoints."""
    stages = {"stage 1": Path(output_dir) / "checkpoints", "stage 2": Path(output_dir) / "checkpoints" / "prior"}
    found = [f"{stage} {saved[-1][0]}" for stage, folder in stages.items() if (saved := numbered_checkpoints(folder))]
    return ["Epochs trained: " + ", ".join(found)] if found else []


def reconstruction_lines(r: dict) -> list[str]:
    """The reconstruction figures of ``reconstruction_metrics.json``."""
    return [
        f"Test reconstruction: SSIM {r['ssim']:.3f}, PSNR {r['psnr']:.2f} dB, MS-SSIM {r['ms_ssim']:.3f} "
        f"on {r['n_images']} slices"
    ]


REFERENCE_LABELS = (
    ("_real_baseline", "real-vs-real"),
    ("_reconstruction_baseline", "reconstructed-vs-real"),
    ("_real_top_baseline", "real-top-vs-real"),
)


def _references(g: dict, *keys: str) -> str:
    """``"real-vs-real 0.896, 0.625; reconstructed-vs-real 0.917, 0.583; real-top-vs-real ..."`` for ``keys``; each
    reference only where the report has it."""
    parts = [
        f"{label} " + ", ".join(f"{g[key + suffix]:.3f}" for key in keys)
        for suffix, label in REFERENCE_LABELS
        if all(key + suffix in g for key in keys)
    ]
    return "; ".join(parts)


def generation_lines(g: dict) -> list[str]:
    """The generation figures of ``generation_metrics.json``, each beside real train vs real test (and beside
    reconstructed train, and train with real top codes, vs real test where the report has them)."""
    lines = [
        f"Prior NLL: top {g['nll_bits_top']:.3f}, bottom {g['nll_bits_bottom']:.3f} bits/code",
        f"FID {g['fid']:.3f} ({_references(g, 'fid')}) on {g['num_samples']} samples",
    ]
    if "c2st_accuracy" not in g:
        return lines + [f"Realism measures skipped: {g.get('realism_skipped', 'not in the report')}"]
    lines.append(
        f"Classifier two-sample accuracy {g['c2st_accuracy']:.3f} ({_references(g, 'c2st_accuracy')}; "
        "0.5 = indistinguishable)"
    )
    lines.append(f"Precision {g['precision']:.3f}, recall {g['recall']:.3f} ({_references(g, 'precision', 'recall')})")
    if "density" in g:
        lines.append(
            f"Density {g['density']:.3f}, coverage {g['coverage']:.3f} ({_references(g, 'density', 'coverage')})"
        )
    return lines


REPORTS = {
    "reconstruction_metrics.json": ("configs/evaluate.json", reconstruction_lines),
    "generation_metrics.json": ("configs/evaluate_generation.json", generation_lines),
}

if __name__ == "__main__":
    print("\n".join(summary(sys.argv[1] if len(sys.argv) > 1 else "outputs")))
