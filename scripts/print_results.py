"""Print the demo's headline figures from ``<output_dir>/reconstruction_metrics.json`` and ``generation_metrics.json``.

Each generation figure is printed beside the same figure for real training slices against real test slices.
Usage: ``python scripts/print_results.py outputs``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(output_dir: str | Path) -> list[str]:
    """The lines to print.

    Args:
        output_dir: the workflows' ``output_dir``.

    Returns:
        Human-readable lines, one figure each.
    """
    output_dir = Path(output_dir)
    r = json.loads((output_dir / "reconstruction_metrics.json").read_text())
    g = json.loads((output_dir / "generation_metrics.json").read_text())
    lines = [
        f"Test reconstruction: SSIM {r['ssim']:.3f}, PSNR {r['psnr']:.2f} dB, MS-SSIM {r['ms_ssim']:.3f} "
        f"on {r['n_images']} slices",
        f"Prior NLL: top {g['nll_bits_top']:.3f}, bottom {g['nll_bits_bottom']:.3f} bits/code",
        f"FID {g['fid']:.3f} (real-vs-real {g['fid_real_baseline']:.3f}) on {g['num_samples']} samples",
    ]
    if "c2st_accuracy" in g:
        lines.append(
            f"Classifier two-sample accuracy {g['c2st_accuracy']:.3f} (real-vs-real {g['c2st_accuracy_real_baseline']:.3f};"
            " 0.5 = indistinguishable)"
        )
        lines.append(
            f"Precision {g['precision']:.3f}, recall {g['recall']:.3f} "
            f"(real-vs-real {g['precision_real_baseline']:.3f}, {g['recall_real_baseline']:.3f})"
        )
    else:
        lines.append(f"Realism measures skipped: {g.get('realism_skipped', 'not in the report')}")
    return lines


if __name__ == "__main__":
    print("\n".join(summary(sys.argv[1] if len(sys.argv) > 1 else "outputs")))
