"""Codebook health for MONAI's EMA vector quantiser: initialisation from data and dead-code restart.

With MONAI's default normal initialisation the codes start far from the encoder's outputs; with EMA decay
0.99 every vector then maps to one code and the model never learns (see the project notes). Initialising the
codebook by k-means on real encoder outputs, and moving codes unused for a whole epoch onto recent encoder
outputs, keeps most of the codebook alive.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from monai.networks.layers.vector_quantizer import EMAQuantizer


def find_quantizers(network: torch.nn.Module) -> dict[str, EMAQuantizer]:
    """Every EMA quantiser inside a (possibly DDP-wrapped or compiled) VQ-VAE, by level name.

    A level's name is the quantiser's attribute name without a ``_quantizer`` suffix (``top_quantizer`` ->
    ``top``), or its full module path (dots as underscores) where that name would repeat.

    Raises:
        TypeError: when the network holds no ``EMAQuantizer``.
    """
    found: dict[str, EMAQuantizer] = {}
    for path, module in network.named_modules():
        if isinstance(module, EMAQuantizer):
            name = path.rsplit(".", 1)[-1].removesuffix("_quantizer")
            found[path.replace(".", "_") if name in found else name] = module
    if not found:
        raise TypeError(f"{type(network).__name__} holds no monai EMAQuantizer.")
    return found


def find_quantizer(network: torch.nn.Module) -> EMAQuantizer:
    """The EMA quantiser of a single-level VQ-VAE.

    Raises:
        TypeError: when the network holds no ``EMAQuantizer`` or several (use :func:`find_quantizers`).
    """
    quantizers = find_quantizers(network)
    if len(quantizers) > 1:
        raise TypeError(f"{type(network).__name__} holds {len(quantizers)} quantisers {list(quantizers)}.")
    return next(iter(quantizers.values()))


def flatten_encodings(encodings: torch.Tensor) -> torch.Tensor:
    """Encoder outputs ``[B, D, *spatial]`` as vectors ``[N, D]`` in fp32."""
    return encodings.detach().float().movedim(1, -1).reshape(-1, encodings.shape[1])


@torch.no_grad()
def kmeans(
    vectors: torch.Tensor, k: int, iterations: int = 10, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Lloyd k-means with k-means++ seeding (which spreads the initial centres over all clusters).

    Args:
        vectors: ``[N, D]`` data.
        k: number of centres. When ``N < k`` the vectors are repeated with small noise so every centre differs.
        iterations: Lloyd iterations.
        generator: random generator for reproducible seeding.

    Returns:
        ``[k, D]`` centres; a centre that loses all its vectors keeps its previous value.
    """
    if vectors.shape[0] < k:
        repeats = -(-k // vectors.shape[0])
        noise = 1e-3 * vectors.std() * torch.randn(vectors.shape[0] * repeats, vectors.shape[1], generator=generator)
        vectors = vectors.repeat(repeats, 1) + noise.to(vectors)
    centres = _kmeans_plus_plus(vectors, k, generator)
    for _ in range(iterations):
        assignment = torch.cdist(vectors, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, vectors)
        counts = torch.bincount(assignment, minlength=k).unsqueeze(1).to(vectors)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def _kmeans_plus_plus(vectors: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    first = int(torch.randint(vectors.shape[0], (1,), generator=generator))
    chosen = [first]
    nearest = ((vectors - vectors[first]) ** 2).sum(1)
    for _ in range(1, k):
        weights = nearest.cpu().double()
        index = int(torch.multinomial(weights / weights.sum(), 1, generator=generator)) if weights.sum() > 0 else 0
        chosen.append(index)
        nearest = torch.minimum(nearest, ((vectors - vectors[index]) ** 2).sum(1))
    return vectors[chosen].clone()


@torch.no_grad()
def set_codes(quantizer: EMAQuantizer, indices: torch.Tensor, values: torch.Tensor, cluster_size: float = 1.0) -> None:
    """Moves codes ``indices`` to ``values`` and makes the EMA statistics agree with the new positions.

    The EMA quantiser stores each code as ``ema_w / cluster_size``; writing only the embedding would be
    undone at the next training step, so both running sums are reset for these codes.
    """
    values = values.to(quantizer.embedding.weight)
    quantizer.embedding.weight.data[indices] = values
    quantizer.ema_cluster_size.data[indices] = cluster_size
    quantizer.ema_w.data[indices] = values * cluster_size


@torch.no_grad()
def init_codebook(quantizer: EMAQuantizer, encodings: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Initialises every code by k-means on encoder outputs (identically on every distributed rank).

    Args:
        quantizer: the EMA quantiser to initialise.
        encodings: encoder outputs ``[B, D, *spatial]``.
        generator: random generator for reproducible k-means seeding.
    """
    vectors = flatten_encodings(encodings)
    centres = kmeans(vectors.cpu(), quantizer.num_embeddings, generator=generator).to(vectors.device)
    all_codes = torch.arange(quantizer.num_embeddings, device=vectors.device)
    set_codes(quantizer, all_codes, centres, cluster_size=max(1.0, vectors.shape[0] / quantizer.num_embeddings))
    broadcast_codebook(quantizer)


@torch.no_grad()
def restart_dead_codes(
    quantizer: EMAQuantizer, counts: torch.Tensor, pool: torch.Tensor, generator: torch.Generator | None = None
) -> int:
    """Moves every code with zero count onto a random vector of ``pool`` (recent encoder outputs).

    Args:
        quantizer: the EMA quantiser.
        counts: per-code use counts over the last epoch (summed over ranks).
        pool: ``[N, D]`` recent encoder outputs.
        generator: random generator for the choice of vectors.

    Returns:
        The number of codes restarted.
    """
    dead = torch.nonzero(counts == 0).flatten()
    if dead.numel() == 0 or pool.shape[0] == 0:
        return 0
    choice = torch.randint(pool.shape[0], (dead.numel(),), generator=generator)
    # A little noise keeps codes restarted onto the same vector from staying identical twins.
    noise = torch.randn(dead.numel(), pool.shape[1], generator=generator).to(pool)
    values = pool[choice.to(pool.device)] + 0.01 * pool.std() * noise
    set_codes(quantizer, dead.to(quantizer.embedding.weight.device), values)
    broadcast_codebook(quantizer)
    return int(dead.numel())


def broadcast_codebook(quantizer: EMAQuantizer) -> None:
    """Copies rank 0's codebook and EMA statistics to every rank, so ranks never drift apart."""
    if dist.is_available() and dist.is_initialized():
        for tensor in (quantizer.embedding.weight.data, quantizer.ema_cluster_size.data, quantizer.ema_w.data):
            dist.broadcast(tensor, src=0)
