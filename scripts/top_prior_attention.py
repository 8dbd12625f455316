"""Does causal self-attention pay in the top prior? The top prior trained alone, with and without it, seed by seed.

Run from the repository root after stage 2 and the generation evaluation (they cache the code maps)::

    python scripts/top_prior_attention.py --codes_dir outputs/codes --json docs/top_prior_attention.json
    python scripts/top_prior_attention.py --codes_dir <run>/outputs/codes --overlay configs/hipmri_gpu.json

The top prior is built from ``configs/inference.json`` (``num_embeddings[0]``, ``prior_channels[0]``,
``prior_layers[0]``, ``prior_kernel_size``, ``prior_head_channels``) and trained as stage 2 trains it
(``prior_batch_size`` and ``prior_learning_rate`` of ``configs/train_prior.json``, Adam, a validation each epoch,
the best weights kept, stopped after ``prior_level_patience`` validations without improvement), in fp32, on the
top maps of ``<codes_dir>/train.pt``, validated on ``validate.pt`` and tested on ``test.pt``. The variant adds one
block of masked multi-head self-attention over all positions of the map (PixelSNAIL's idea, van den Oord's gated
stack kept): it reads the summed skip features, so every position can attend to every earlier one directly.
Both variants start from the same seed; the result is the test NLL in bits per code, seed by seed and as a mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_sampling import machine_info  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from bundle.stage2_prior.pixelcnn import GatedPixelCNN  # noqa: E402
from bundle.stage2_prior.two_level import nll_bits  # noqa: E402

VARIANTS = ("gated", "gated + attention")


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention over the positions of a ``[B, C, H, W]`` map in raster order, residual.

    Position ``p`` attends to positions ``0 .. p``. That is causal for features that at ``p`` depend only on codes
    before ``p``, as the gated stack's skip features do (its first layer has mask "A").

    Args:
        channels: feature channels ``C``, divisible by ``heads``.
        heads: attention heads.
        shape: ``(H, W)`` of the map, for the learned position embedding.
    """

    def __init__(self, channels: int, heads: int, shape: Sequence[int]) -> None:
        super().__init__()
        height, width = int(shape[0]), int(shape[1])
        self.position = nn.Parameter(torch.zeros(1, channels, height, width))
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        later = torch.ones(height * width, height * width, dtype=torch.bool).triu(1)
        self.register_buffer("later", later, persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` plus attention over the current and earlier positions, the same shape."""
        batch, channels, height, width = features.shape
        x = self.norm((features + self.position).flatten(2).transpose(1, 2))
        attended, _ = self.attention(x, x, x, attn_mask=self.later, need_weights=False)
        return features + attended.transpose(1, 2).reshape(batch, channels, height, width)


def top_prior(config: dict, shape: Sequence[int], heads: int) -> GatedPixelCNN:
    """The bundle's top prior; with ``heads > 0`` its output head first applies :class:`CausalSelfAttention`."""
    prior = GatedPixelCNN(
        num_embeddings=config["num_embeddings"][0],
        channels=config["prior_channels"][0],
        num_layers=config["prior_layers"][0],
        kernel_size=config["prior_kernel_size"],
        head_channels=config["prior_head_channels"],
    )
    if heads > 0:
        prior.head = nn.Sequential(CausalSelfAttention(prior.channels, heads, shape), prior.head)
    return prior


@torch.no_grad()
def mean_nll_bits(prior: GatedPixelCNN, codes: torch.Tensor, batch_size: int = 64) -> float:
    """Mean NLL of ``codes`` in bits per code, in eval mode."""
    prior.eval()
    total = sum(nll_bits(prior(batch), batch).item() * len(batch) for batch in codes.split(batch_size))
    prior.train()
    return total / len(codes)


def train(prior: GatedPixelCNN, splits: dict, config: dict, epochs: int, seed: int) -> dict:
    """Stage 2's schedule for one level; returns the validation history, the best epoch and the test NLL."""
    optimizer = torch.optim.Adam(prior.parameters(), lr=config["prior_learning_rate"])
    order = torch.Generator().manual_seed(seed)
    history: list[float] = []
    best_state, start = None, time.perf_counter()
    for _ in range(epochs):
        for index in torch.randperm(len(splits["train"]), generator=order).split(config["prior_batch_size"]):
            batch = splits["train"][index]
            loss = nll_bits(prior(batch), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append(mean_nll_bits(prior, splits["validate"]))
        if history[-1] == min(history):
            best_state = {k: v.clone() for k, v in prior.state_dict().items()}
        elif len(history) - 1 - history.index(min(history)) >= config["prior_level_patience"]:
            break
    prior.load_state_dict(best_state)
    return {
        "validation_nll_bits": [round(v, 4) for v in history],
        "best_epoch": history.index(min(history)) + 1,
        "test_nll_bits": round(mean_nll_bits(prior, splits["test"]), 4),
        "parameters": sum(p.numel() for p in prior.parameters()),
        "seconds": round(time.perf_counter() - start, 1),
    }


def read_config(overlay: Sequence[str] = ()) -> dict:
    """The top prior's sizes and stage 2's schedule from the bundle's configs, then from ``overlay``'s files."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / name) for name in ("inference.json", "train_prior.json")] + [*overlay])
    keys = ("num_embeddings", "prior_channels", "prior_layers", "prior_kernel_size", "prior_head_channels")
    keys += ("prior_batch_size", "prior_learning_rate", "prior_level_patience")
    return {key: parser[key] for key in keys}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``None`` reads ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes_dir", default=str(ROOT / "outputs" / "codes"), help="train/validate/test.pt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", type=int, default=4, help="attention heads of the variant")
    parser.add_argument("--epochs", type=int, default=12, help="at most; stage 2's prior_max_epochs")
    parser.add_argument("--overlay", nargs="*", default=[], help="config files read last (configs/hipmri_gpu.json)")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train both variants at every seed and print and return the test NLLs."""
    args = parse_args(argv)
    splits = {
        split: torch.load(Path(args.codes_dir) / f"{split}.pt", weights_only=True)["top"].long()
        for split in ("train", "validate", "test")
    }
    config = read_config(args.overlay)
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for seed in args.seeds:
        for variant, heads in zip(VARIANTS, (0, args.heads)):
            torch.manual_seed(seed)
            prior = top_prior(config, splits["train"].shape[1:], heads)
            runs[variant].append({"seed": seed, **train(prior, splits, config, args.epochs, seed)})
            print(f"seed {seed} {variant:18s} {json.dumps(runs[variant][-1])}", flush=True)
    means = {variant: round(statistics.fmean(r["test_nll_bits"] for r in runs[variant]), 4) for variant in VARIANTS}
    print(f"mean test NLL of the top level (bits per code): {json.dumps(means)}")
    result = {
        "command": "python scripts/top_prior_attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(torch.device("cpu")),
        "config": config,
        "train_maps": len(splits["train"]),
        "runs": runs,
        "mean_test_nll_bits": means,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=4) + "\n")
    return result


if __name__ == "__main__":
    main()
