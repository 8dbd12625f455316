"""Realism measures for generated slices that per-channel texture statistics cannot certify.

``bundle.evaluation.metrics`` compares images through per-channel means and standard deviations of encoder
features, which a picture with the right texture in the wrong places can match. The measures here look at
layout and at the shape of the distributions:

* ``classifier_two_sample_test``: a small CNN (MONAI ``Classifier``, whose last layer is a linear map over the
  whole feature grid and so sees where things are) is trained to tell generated from real slices; its held-out
  accuracy is 0.5 when it cannot.
* ``precision_recall``: improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) with density and
  coverage (Naeem et al., ICML 2020) from the same k-nearest-neighbour balls: fidelity and coverage of the real
  distribution separately, where FID/KID give one number.
* ``multiscale_pooled_features`` with ``encoder_block_outputs``: features from several depths of a frozen encoder,
  each average-pooled onto a coarse spatial grid (layout) besides its global mean and std (texture).

All functions take ``torch.Tensor`` inputs and return Python numbers, dicts of numbers or CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import Classifier
from scipy.stats import binomtest
from torch import Tensor, nn

from bundle.evaluation.metrics import _check_feature_pair

__all__ = ["classifier_two_sample_test", "precision_recall", "multiscale_pooled_features", "encoder_block_outputs"]

# Fewest images per set the two-sample test accepts: 4 to train on and 4 to test on per class. Below this the
# held-out accuracy takes so few values that it says nothing (with 4 + 4 test images, p < 0.05 needs 7 of 8).
MIN_IMAGES_PER_SET = 8

# Rows of a distance matrix computed at once: bounds memory to about 8 kB per row per thousand columns.
_CDIST_ROW_CHUNK = 1024


# --------------------------------------------------------------------------------------------------------------
# Classifier two-sample test
# --------------------------------------------------------------------------------------------------------------


def _check_image_pair(generated: Tensor, real: Tensor) -> int:
    """Validate the two image sets of the two-sample test and return the number of images used per set.

    Args:
        generated: ``[N_g, C, H, W]`` images.
        real: ``[N_r, C, H, W]`` images.

    Returns:
        ``min(N_g, N_r)``.

    Raises:
        ValueError: if either set is not 4D, their ``C, H, W`` differ, or the smaller set has fewer than
            ``MIN_IMAGES_PER_SET`` images.
    """
    if generated.ndim != 4 or real.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(generated.shape)} and {tuple(real.shape)}.")
    if generated.shape[1:] != real.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(generated.shape[1:])} vs {tuple(real.shape[1:])}.")
    n = min(generated.shape[0], real.shape[0])
    if n < MIN_IMAGES_PER_SET:
        raise ValueError(
            f"the two-sample test needs at least {MIN_IMAGES_PER_SET} images per set (half to train, half to "
            f"test), got {generated.shape[0]} generated and {real.shape[0]} real."
        )
    return n


def _split_halves(
    images: Tensor, n: int, generator: torch.Generator, groups: Sequence[object] | None = None
) -> tuple[Tensor, Tensor]:
    """A seeded random choice of ``n`` images, split into a training half and a test half.

    With ``groups`` (for example the scan each slice comes from), the chosen images are ordered group by group
    before the cut, so slices of one scan fall in the same half (all but at most the one group at the cut).
    Otherwise a classifier could learn a scan from some of its slices and recognise the rest, which says nothing
    about the two distributions.

    Args:
        images: ``[N, C, H, W]`` images with ``N >= n``.
        n: number of images to use.
        generator: private generator that picks and orders the images.
        groups: ``N`` hashable group labels, or None when every image is independent.

    Returns:
        ``(train, test)`` with ``n // 2`` and ``n - n // 2`` images.
    """
    chosen = torch.randperm(images.shape[0], generator=generator)[:n].tolist()
    if groups is not None:
        if len(groups) != images.shape[0]:
            raise ValueError(f"{len(groups)} group labels for {images.shape[0]} images.")
        names = list(dict.fromkeys(groups[i] for i in chosen))  # in order of first appearance, itself random
        rank = {name: r for r, name in enumerate(names)}
        chosen.sort(key=lambda i: rank[groups[i]])  # stable: the random order stays within a group
    picked = images[torch.tensor(chosen, device=images.device)]
    return picked[: n // 2], picked[n // 2 :]


def _build_classifier(in_shape: tuple[int, ...], channels: Sequence[int]) -> nn.Module:
    """The two-sample test's network: stride-2 3x3 convolutions with PReLU, then a linear layer over the final grid.

    No normalisation layers: instance norm would erase per-image intensity differences between the sets, and
    batch statistics would differ between training and evaluation on these small sets.

    Args:
        in_shape: ``(C, H, W)`` of the (downsampled) images.
        channels: output channels of the convolutions, one stride-2 layer each.

    Returns:
        MONAI ``Classifier`` mapping ``[B, C, H, W]`` to one logit per image ``[B, 1]``.
    """
    return Classifier(
        in_shape=in_shape, classes=1, channels=channels, strides=[2] * len(channels), num_res_units=0, norm=None
    )


def _fit_classifier(
    network: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
) -> None:
    """Train ``network`` in place with Adam on the binary cross-entropy of its logits (also when called under
    ``torch.no_grad``, as an evaluation report is).

    Args:
        network: module mapping ``[B, C, H, W]`` to logits ``[B, 1]``.
        inputs: ``[N, C, H, W]`` training images.
        labels: ``[N]`` float labels in ``{0, 1}``.
        epochs: passes over the training set.
        batch_size: images per step.
        learning_rate: Adam learning rate.
        generator: private generator for the minibatch order.
    """
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    network.train()
    with torch.enable_grad():
        _fit_epochs(network, optimizer, inputs, labels, epochs, batch_size, generator)
    network.eval()


def _fit_epochs(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """The minibatch loop of :func:`_fit_classifier`."""
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
        for start in range(0, inputs.shape[0], batch_size):
            batch = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(network(inputs[batch]).squeeze(1), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def classifier_two_sample_test(
    generated: Tensor,
    real: Tensor,
    seed: int = 0,
    epochs: int = 40,
    downsample: int = 2,
    channels: Sequence[int] = (8, 16, 32, 32),
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    generated_groups: Sequence[object] | None = None,
    real_groups: Sequence[object] | None = None,
) -> dict[str, float | int]:
    """Classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017): can a small CNN tell generated from real slices?

    ``n = min(N_g, N_r)`` images are drawn from each set (so the classes are balanced) and split in half. A MONAI
    ``Classifier`` (strided 3x3 convolutions with PReLU, no normalisation, then a linear layer over the whole
    final feature grid, so position matters as well as texture) is trained on the first halves and its accuracy
    is measured on the second. About 0.5 means the classifier found nothing that separates the sets; values well
    above 0.5 mean it did. Below 0.5 is chance (or overfitting to the training half), not "more real than real".

    Power grows with ``n``: a few dozen slices per set expose a wrong layout, while subtle blur, noise or intensity
    shifts need hundreds. Compare with a real-vs-real run of the same size to see the chance spread.

    Preprocessing: images are average-pooled by ``downsample`` (default 2: 256 x 128 slices are classified at
    128 x 64, which keeps anatomy and coarse texture and makes the test 4x cheaper), then standardised with the
    mean and std of the training images of both classes together, which keeps every intensity difference between
    the sets while making the optimiser indifferent to the intensity range.

    Deterministic for a given seed on CPU: the image choice, the split, the network's initialisation and the
    minibatch order come from ``seed`` alone, and the global RNG state is restored afterwards. On a GPU,
    non-deterministic kernels may change the last digits. Training runs on ``generated.device``.

    Args:
        generated: ``[N_g, C, H, W]`` generated images.
        real: ``[N_r, C, H, W]`` real images, same ``C, H, W``.
        seed: seed of everything random in the test.
        epochs: passes over the training halves. With 24 + 24 training slices, 40 epochs (120 Adam steps)
            separate slices with shuffled layout from intact ones perfectly and fit most of the training halves of
            indistinguishable sets, i.e. further epochs mostly memorise.
        downsample: average-pooling factor applied before the classifier (1 = full resolution).
        channels: output channels of the strided convolutions; each halves the spatial size.
        batch_size: training images per Adam step.
        learning_rate: Adam learning rate.
        generated_groups: scan of each generated image, or None when they are independent (samples are).
        real_groups: scan of each real image (slices of one scan are not independent), or None. With groups, the
            training and held-out halves hold different scans, so the accuracy measures the distributions rather
            than how well the classifier recognises scans it has seen.

    Returns:
        Dict with
        ``"accuracy"``: fraction of the held-out images classified correctly (equal numbers per class, so it is
        also the balanced accuracy);
        ``"accuracy_generated"`` / ``"accuracy_real"``: the same within each held-out class;
        ``"p_value"``: one-sided exact binomial test of the number of correct held-out calls against chance
        (probability of at least that many under "indistinguishable");
        ``"n_train_per_class"`` / ``"n_test_per_class"``: ``n // 2`` and ``n - n // 2`` (ints).

    Raises:
        ValueError: on malformed inputs, fewer than ``MIN_IMAGES_PER_SET`` images in either set, ``downsample``,
            ``epochs`` or ``batch_size`` below 1, or images smaller than ``downsample``.
    """
    n = _check_image_pair(generated, real)
    if min(downsample, epochs, batch_size) < 1:
        raise ValueError(f"downsample, epochs and batch_size must be >= 1, got {downsample}, {epochs}, {batch_size}.")
    if min(generated.shape[2:]) < downsample:
        raise ValueError(f"images {tuple(generated.shape[2:])} are smaller than downsample={downsample}.")

    device = generated.device
    generator = torch.Generator().manual_seed(seed)
    gen_train, gen_test = _split_halves(generated.detach().float(), n, generator, generated_groups)
    real_train, real_test = _split_halves(real.detach().float().to(device), n, generator, real_groups)

    train = F.avg_pool2d(torch.cat([gen_train, real_train]), downsample)
    test = F.avg_pool2d(torch.cat([gen_test, real_test]), downsample)
    mean, std = train.mean(), train.std().clamp_min(1e-8)
    train, test = (train - mean) / std, (test - mean) / std
    train_labels = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)]).to(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _build_classifier(tuple(train.shape[1:]), channels).to(device)
    _fit_classifier(network, train, train_labels, epochs, batch_size, learning_rate, generator)

    with torch.no_grad():
        called_generated = (network(test).squeeze(1) > 0).cpu()
    n_test = n - n // 2
    correct_generated = int(called_generated[:n_test].sum())
    correct_real = int((~called_generated[n_test:]).sum())
    correct = correct_generated + correct_real
    return {
        "accuracy": correct / (2 * n_test),
        "accuracy_generated": correct_generated / n_test,
        "accuracy_real": correct_real / n_test,
        "p_value": float(binomtest(correct, 2 * n_test, 0.5, alternative="greater").pvalue),
        "n_train_per_class": n // 2,
        "n_test_per_class": n_test,
    }


# --------------------------------------------------------------------------------------------------------------
# Improved precision / recall, density / coverage
# --------------------------------------------------------------------------------------------------------------


def _kth_neighbour_distance(points: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, the point itself excluded.

    Args:
        points: ``[N, F]`` float64 points, ``N > k``.
        k: neighbour rank (1 = nearest other point).

    Returns:
        ``[N]`` float64 radii. A duplicate of a point counts as a neighbour at distance 0.
    """
    radii = []
    for start in range(0, points.shape[0], _CDIST_ROW_CHUNK):
        distances = torch.cdist(points[start : start + _CDIST_ROW_CHUNK], points)
        # Rank k + 1 because each row contains the point's zero distance to itself.
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _ball_membership(points: Tensor, centres: Tensor, radii: Tensor) -> tuple[Tensor, Tensor]:
    """Which closed balls ``||p - c_i|| <= r_i`` contain which points, summarised both ways.

    Args:
        points: ``[P, F]`` float64 points.
        centres: ``[C, F]`` float64 ball centres.
        radii: ``[C]`` float64 ball radii.

    Returns:
        ``(balls_per_point, ball_is_hit)``: int64 ``[P]`` number of balls containing each point, and bool ``[C]``
        whether each ball contains at least one point.
    """
    counts = []
    hit = torch.zeros(centres.shape[0], dtype=torch.bool)
    for start in range(0, points.shape[0], _CDIST_ROW_CHUNK):
        inside = torch.cdist(points[start : start + _CDIST_ROW_CHUNK], centres) <= radii
        counts.append(inside.sum(dim=1))
        hit |= inside.any(dim=0)
    return torch.cat(counts), hit


def precision_recall(real_features: Tensor, fake_features: Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall, with density and coverage, from k-nearest-neighbour balls.

    Each set's manifold is the union of closed Euclidean balls around its points, each ball's radius being the
    distance from its centre to its ``k``-th nearest neighbour within the same set (Kynkäänniemi et al., NeurIPS
    2019). Precision is the fraction of fake points inside the real manifold (fidelity); recall is the fraction
    of real points inside the fake manifold (how much of the real distribution the fakes cover). Density and
    coverage (Naeem et al., ICML 2020) use the real balls only, which makes them less sensitive to outlying fakes
    that inflate the fake manifold.

    ``k = 3`` is the value Kynkäänniemi et al. recommend; larger ``k`` gives larger balls and higher values on
    both axes. Distances are Euclidean in float64 (``torch.cdist``), so scale features comparably beforehand if
    their columns have very different ranges. Balls are closed (``<=``), so identical sets give 1.0 everywhere.

    Args:
        real_features: ``[N_r, F]`` features of real images.
        fake_features: ``[N_f, F]`` features of generated images.
        k: neighbour rank defining the radii (``1 <= k < min(N_r, N_f)``).

    Returns:
        Dict with
        ``"precision"``: fraction of fake points within some real ball, in ``[0, 1]``;
        ``"recall"``: fraction of real points within some fake ball, in ``[0, 1]``;
        ``"density"``: mean over fake points of the number of real balls containing them, divided by ``k``
        (about 1 when fakes are distributed like the reals; can exceed 1);
        ``"coverage"``: fraction of real balls containing at least one fake point, in ``[0, 1]``.

    Raises:
        ValueError: on malformed inputs (see ``bundle.evaluation.metrics``), ``k < 1``, or a set with ``k`` or
            fewer points.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    real, fake = _check_feature_pair(real_features, fake_features, min_samples=k + 1)
    real_radii = _kth_neighbour_distance(real, k)
    fake_radii = _kth_neighbour_distance(fake, k)
    real_balls_per_fake, real_ball_hit = _ball_membership(fake, real, real_radii)
    fake_balls_per_real, _ = _ball_membership(real, fake, fake_radii)
    return {
        "precision": float((real_balls_per_fake > 0).double().mean()),
        "recall": float((fake_balls_per_real > 0).double().mean()),
        "density": float(real_balls_per_fake.double().mean() / k),
        "coverage": float(real_ball_hit.double().mean()),
    }


# --------------------------------------------------------------------------------------------------------------
# Multi-scale pooled encoder features
# --------------------------------------------------------------------------------------------------------------


def _encoder_blocks(network: nn.Module) -> list[nn.Module]:
    """The ordered blocks of an encoder: ``network.encoder.blocks``, ``network.blocks`` or ``network`` itself.

    Args:
        network: a network with an ``encoder`` attribute (e.g. MONAI's ``VQVAE``), an encoder with a ``blocks``
            attribute (MONAI's ``monai.networks.nets.vqvae.Encoder``), or an ``nn.Sequential``/``nn.ModuleList``.

    Returns:
        The blocks in execution order.

    Raises:
        TypeError: if no ``nn.Sequential``/``nn.ModuleList`` of blocks is found.
    """
    encoder = getattr(network, "encoder", network)
    blocks = getattr(encoder, "blocks", encoder)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(
            "expected a network whose encoder (or itself) is an nn.Sequential/nn.ModuleList or has one as "
            f"`.blocks`, got {type(blocks).__name__}; pass a callable returning feature maps instead."
        )
    return list(blocks)


def _last_per_resolution(outputs: list[Tensor]) -> list[Tensor]:
    """The last output before each change of spatial size, and the final output.

    Args:
        outputs: block outputs in execution order.

    Returns:
        The selected outputs, in order.
    """
    return [out for out, nxt in zip(outputs, outputs[1:] + [None]) if nxt is None or nxt.shape[2:] != out.shape[2:]]


def encoder_block_outputs(network: nn.Module, indices: Sequence[int] | None = None) -> Callable[[Tensor], list[Tensor]]:
    """A feature extractor that runs an encoder's blocks in order and returns intermediate outputs.

    Works with MONAI's ``VQVAE`` (whose ``encoder.blocks`` is an ``nn.ModuleList``), its ``Encoder`` directly, or
    any ``nn.Sequential``. The encoder must be a plain chain (each block's input is the previous block's output);
    for other architectures write the callable by hand. The network's mode is left as it is: put it in eval mode.

    Args:
        network: see ``_encoder_blocks``.
        indices: block indices whose outputs to return (negative indices count from the end). ``None`` returns,
            for each spatial resolution, the output of the last block at that resolution (for MONAI's ``VQVAE``
            with two downsamplings: the residual stack at 1/2 and the pre-quantisation latents at 1/4).

    Returns:
        Callable mapping images ``[B, C, H, W]`` to the list of selected feature maps.

    Raises:
        TypeError: if ``network`` has no recognisable stack of blocks.
        ValueError: if ``indices`` is empty or an index is out of range.
    """
    blocks = _encoder_blocks(network)
    if indices is not None:
        if len(indices) == 0 or any(not -len(blocks) <= i < len(blocks) for i in indices):
            raise ValueError(f"indices must be a non-empty list within [-{len(blocks)}, {len(blocks)}), got {indices}.")
        indices = list(indices)

    def extract(images: Tensor) -> list[Tensor]:
        outputs = []
        x = images
        for block in blocks:
            x = block(x)
            outputs.append(x)
        if indices is None:
            return _last_per_resolution(outputs)
        return [outputs[i] for i in indices]

    return extract


def _pool_feature_map(feature_map: Tensor, grid: tuple[int, int]) -> Tensor:
    """Grid-pooled means, global means and global stds of one feature map, in float64.

    Args:
        feature_map: ``[B, C, h, w]``.
        grid: ``(rows, columns)`` of the average-pooling grid.

    Returns:
        ``[B, C * (rows * columns + 2)]``: the grid cells (channel-major), then per-channel means, then per-channel
        population stds.
    """
    flat = feature_map.detach().double()
    cells = F.adaptive_avg_pool2d(flat, grid).flatten(1)
    spatial = flat.flatten(2)
    return torch.cat([cells, spatial.mean(dim=-1), spatial.std(dim=-1, correction=0)], dim=1)


@torch.no_grad()
def multiscale_pooled_features(
    extractor: Callable[[Tensor], Sequence[Tensor]],
    images: Tensor,
    grid: tuple[int, int] = (4, 2),
    batch_size: int = 16,
) -> Tensor:
    """Feature vectors that keep coarse layout: encoder maps from several depths, pooled onto a spatial grid.

    Each feature map ``[B, C, h, w]`` returned by ``extractor`` contributes its adaptive average pooling onto a
    ``grid`` (where the features are) and its per-channel spatial mean and std (which features, as in
    ``bundle.evaluation.metrics.encoder_features``): ``C * (rows * columns + 2)`` numbers per map. A picture with
    the right texture in the wrong arrangement matches the means and stds but not the grid cells. The default
    grid (4, 2) has square cells on 256 x 128 slices; maps smaller than the grid are upsampled by the pooling.

    Depths with large activations or many channels weigh more in Euclidean distances; standardise the columns
    (e.g. with the real set's mean and std) before ``precision_recall`` if that matters.

    Args:
        extractor: callable mapping ``[B, C_in, H, W]`` to a sequence of feature maps ``[B, C_i, h_i, w_i]``, e.g.
            ``encoder_block_outputs(vqvae)`` or a hand-written function for another encoder. Put networks in eval
            mode; gradients are disabled here.
        images: ``[N, C_in, H, W]`` images (``N >= 1``), on the extractor's device.
        grid: ``(rows, columns)`` of the pooling grid.
        batch_size: images per extractor call (bounds memory; does not change the result beyond round-off).

    Returns:
        Float32 CPU tensor ``[N, sum_i C_i * (rows * columns + 2)]``, the maps' blocks in the extractor's order.

    Raises:
        ValueError: if ``images`` is empty, ``batch_size`` or a grid size is below 1, or the extractor returns
            no maps or a map that is not ``[B, C, h, w]``.
    """
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch [N, C, H, W], got shape {tuple(images.shape)}.")
    if batch_size < 1 or min(grid) < 1:
        raise ValueError(f"batch_size and grid sizes must be >= 1, got {batch_size} and {grid}.")

    chunks: list[Tensor] = []
    for start in range(0, images.shape[0], batch_size):
        maps = extractor(images[start : start + batch_size])
        if len(maps) == 0 or any(not isinstance(m, Tensor) or m.ndim != 4 for m in maps):
            shapes = [tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__ for m in maps]
            raise ValueError(f"extractor must return a non-empty sequence of [B, C, h, w] maps, got {shapes}.")
        chunks.append(torch.cat([_pool_feature_map(m, grid) for m in maps], dim=1).float().cpu())
    return torch.cat(chunks, dim=0)
