"""Write a synthetic HipMRI-layout phantom data set (and optionally a preview figure).

With no arguments it writes the demo set where the configs look for data by default, ``<repository>/data/phantom``;
a complete set with the same settings is left untouched. Example:
    python scripts/make_phantoms.py --out_dir data/phantom --train_cases 20 \
        --val_cases 3 --test_cases 8 --slices_per_case 16 --seed 0 --figure docs/phantoms.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Run as a plain script from anywhere: make the repository's `bundle` importable.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.data.phantom import demo_data_dir, save_phantom_figure, write_hipmri_phantoms  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(demo_data_dir(ROOT)), help="dataset folder (default: %(default)s)")
    parser.add_argument("--train_cases", type=int, default=20)
    parser.add_argument("--val_cases", type=int, default=3)
    parser.add_argument("--test_cases", type=int, default=8)
    parser.add_argument("--slices_per_case", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trailing_axis_every", type=int, default=0, help="store every k-th image as (256, W, 1); 0 = never"
    )
    parser.add_argument("--figure", default=None, help="also save a preview PNG here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Writes the data set (and the figure) and reports what is on disk.

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        Process exit status.
    """
    args = parse_args(argv)
    start = time.perf_counter()
    counts = write_hipmri_phantoms(
        args.out_dir,
        train_cases=args.train_cases,
        val_cases=args.val_cases,
        test_cases=args.test_cases,
        slices_per_case=args.slices_per_case,
        seed=args.seed,
        trailing_axis_every=args.trailing_axis_every,
    )
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    print(
        f"phantom slices: train={counts['train']} validate={counts['validate']} test={counts['test']} "
        f"(total {total} images + {total} masks) in {elapsed:.1f}s"
    )
    print(f"dataset_dir: {Path(args.out_dir).resolve()}")
    if args.figure:
        figure = save_phantom_figure(args.figure, seed=args.seed, num_slices=args.slices_per_case)
        print(f"figure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
