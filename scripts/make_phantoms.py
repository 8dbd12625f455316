"""Write a synthetic HipMRI-layout phantom data set (and optionally a preview figure).

Example (from the repository root):
    python scripts/make_phantoms.py --out_dir data/phantom --train_cases 20 \
        --val_cases 3 --test_cases 3 --slices_per_case 16 --seed 0 --figure docs/phantoms.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run as a plain script from anywhere: make the repository's `bundle` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.data.phantom import save_phantom_figure, write_hipmri_phantoms  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parses arguments, writes the data set and reports what is on disk.

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        Process exit status.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="data/phantom", help="dataset directory to create")
    p.add_argument("--train_cases", type=int, default=20)
    p.add_argument("--val_cases", type=int, default=3)
    p.add_argument("--test_cases", type=int, default=3)
    p.add_argument("--slices_per_case", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trailing_axis_every", type=int, default=0,
                   help="store every k-th image as (256, W, 1) like some real files; 0 = never")
    p.add_argument("--figure", default=None, help="also save a preview PNG here (needs matplotlib)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    counts = write_hipmri_phantoms(args.out_dir, args.train_cases, args.val_cases, args.test_cases,
                                   args.slices_per_case, args.seed, args.trailing_axis_every)
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    print(f"phantom slices: train={counts['train']} validate={counts['validate']} "
          f"test={counts['test']} (total {total} images + {total} masks) in {elapsed:.1f}s")
    print(f"dataset_dir: {Path(args.out_dir).resolve()}")
    if args.figure:
        fig = save_phantom_figure(args.figure, seed=args.seed, num_slices=args.slices_per_case)
        print(f"figure: {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
