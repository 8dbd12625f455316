"""Sampling code maps from :class:`~bundle.stage2_prior.pixelcnn.GatedPixelCNN` priors, one level or two.

Two samplers that return exactly the same code maps for the same weights and seed:

* :func:`sample_naive` runs one full forward pass per position (``H * W`` passes).
* :func:`sample_fast` generates incrementally with per-layer caches (Ramachandran et
  al. 2017, "Fast Generation for Convolutional Autoregressive Models"). When a row
  starts, the vertical stack is computed for the row above only (it depends on rows
  that are complete); then, for each column, the horizontal stack of every layer is
  computed at that single position from the cached left context of the layer's input,
  followed by the output head. The total work is about one full forward pass.

A spatially conditioned model (the bottom level of a two-level prior) gets its
conditioning code map as ``cond_codes``: both samplers run the conditioning stack once
up front; the fast one then projects one row of its features per layer as the row starts.

On a GPU the fast sampler would wait on kernel launches: every position runs a few
small kernels per layer. :class:`RowSampler` holds one row's horizontal pass in fixed
buffers, so on CUDA it is captured once as a CUDA graph and replayed per row (one launch
a row instead of thousands); when capture fails, the reason is logged and the same pass
runs eagerly. The replay runs the kernels of the eager pass, so the codes are the same.

Exactness: the full convolution and the cached computation may differ in the last
bits of floating point, so both samplers draw all randomness up front in a fixed
order (``u = torch.rand(N, H, W)``) and pick each code by inverse CDF on the softmax
(the first code whose cumulative probability exceeds ``u``), computed in float64.
A rounding difference can then only change a sample if ``u`` falls within rounding
distance of a CDF boundary. ``temperature=0`` means argmax (greedy decoding).

:func:`sample_codes` samples a two-level prior: the top map first, then the bottom map
conditioned on it, each level from its own generator, so sample ``n`` of a seed is the
same whatever the batch it is drawn in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from bundle.stage2_prior.pixelcnn import GatedPixelCNN

if TYPE_CHECKING:
    from bundle.stage2_prior.two_level import TwoLevelPrior

logger = logging.getLogger(__name__)

__all__ = [
    "sample_naive",
    "sample_fast",
    "sample_fast_eager",
    "RowSampler",
    "graph_if_possible",
    "CacheBuffers",
    "cache_buffers",
    "sample_level",
    "sample_codes",
    "level_generators",
    "pick_codes",
    "condition_features",
    "eval_on",
    "cached_weights",
    "row_links",
    "position_logits",
]


def pick_codes(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """Pick one code per sample by inverse CDF on ``softmax(logits / temperature)``.

    Args:
        logits: ``[N, K]``.
        u: uniform draws ``[N]`` in ``[0, 1)``.
        temperature: softmax temperature; 0 means argmax.

    Returns:
        int64 codes ``[N]``.
    """
    if temperature == 0:
        return logits.argmax(dim=1)
    # float64 so fp32 and fp64 models share the same selection arithmetic
    cdf = torch.softmax(logits.double() / temperature, dim=1).cumsum_(dim=1)
    idx = torch.searchsorted(cdf, u.view(-1, 1), right=True).view(-1)
    # u can exceed cdf[-1] when the rounded total is slightly below 1
    return idx.clamp_(max=logits.shape[1] - 1)


def _prepare(
    model: GatedPixelCNN,
    shape: Sequence[int],
    num_samples: int,
    temperature: float,
    labels: torch.Tensor | int | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> tuple[torch.device, torch.Tensor | None, torch.Tensor]:
    """Validate sampler arguments, draw the uniforms and move labels to the device.

    Returns:
        ``(device, labels, u)`` with ``u`` float64 ``[H, W, N]`` on ``device``.
    """
    if len(shape) != 2 or int(shape[0]) < 1 or int(shape[1]) < 1:
        raise ValueError(f"shape must be (H, W) with positive sizes, got {shape}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means argmax), got {temperature}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(labels, int):
        labels = torch.full((num_samples,), labels, dtype=torch.long)
    model.check_labels(labels, num_samples)
    if labels is not None:
        labels = labels.to(device=device, dtype=torch.long)
    # draw on the generator's device (CPU by default) so a seed gives the same maps everywhere
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(
        num_samples, int(shape[0]), int(shape[1]), generator=generator, dtype=torch.float64, device=gen_device
    )
    # stored [H, W, N] so the draws for one position are contiguous
    return device, labels, u.permute(1, 2, 0).contiguous().to(device)


def condition_features(
    model: GatedPixelCNN, cond_codes: torch.Tensor | None, num_samples: int, shape: Sequence[int], device: torch.device
) -> torch.Tensor | None:
    """The model's conditioning features ``[N, cond_channels, H, W]`` for ``cond_codes`` (None without)."""
    if cond_codes is not None:
        cond_codes = cond_codes.to(device)
    return model.condition(cond_codes, (num_samples, int(shape[0]), int(shape[1])))


@contextlib.contextmanager
def eval_on(model: GatedPixelCNN, device: torch.device) -> Iterator[None]:
    """Put ``model`` in eval mode on ``device`` and restore its mode and device afterwards."""
    was_training = model.training
    old_device = next(model.parameters()).device
    model.eval()
    if old_device != device:
        model.to(device)
    try:
        yield
    finally:
        if old_device != device:
            model.to(old_device)
        model.train(was_training)


@torch.no_grad()
def sample_naive(
    model: GatedPixelCNN,
    shape: Sequence[int],
    num_samples: int,
    temperature: float = 1.0,
    labels: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    return_logits: bool = False,
    max_positions: int | None = None,
    cond_codes: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample code maps with one full forward pass per position.

    Args:
        model: the prior.
        shape: ``(H, W)`` of the code map.
        num_samples: number of maps ``N``.
        temperature: softmax temperature; 0 means argmax.
        labels: int64 ``[N]`` (or one int for all) for a class-conditioned model, else None.
        generator: random generator; uniforms are drawn on its device (CPU if None).
        device: where to run; defaults to the model's device (the model is moved
            there for the call and moved back afterwards).
        return_logits: also return the logits used at every position.
        max_positions: stop after this many positions in raster order, leaving the rest 0
            (for timing a prefix: every position costs one full forward pass).
        cond_codes: integer ``[N, h, w]`` conditioning code maps for a spatially conditioned model, else None;
            the conditioning stack runs once.

    Returns:
        int64 codes ``[N, H, W]``, and float logits ``[N, K, H, W]`` if ``return_logits``.
    """
    device, labels, u = _prepare(model, shape, num_samples, temperature, labels, generator, device)
    height, width = int(shape[0]), int(shape[1])
    codes = torch.zeros(num_samples, height, width, dtype=torch.long, device=device)
    all_logits = None
    if return_logits:
        dtype = next(model.parameters()).dtype
        all_logits = torch.zeros(num_samples, model.num_embeddings, height, width, dtype=dtype, device=device)
    positions = [(i, j) for i in range(height) for j in range(width)][:max_positions]
    with eval_on(model, device):
        cond = condition_features(model, cond_codes, num_samples, shape, device)
        for i, j in positions:
            # positions >= (i, j) still hold 0; causality makes them irrelevant here
            logits = model.forward_embedded(model.embed(codes), labels, cond)[:, :, i, j]
            codes[:, i, j] = pick_codes(logits, u[i, j], temperature)
            if all_logits is not None:
                all_logits[:, :, i, j] = logits
    return (codes, all_logits) if return_logits else codes


def _matrix(conv_weight: torch.Tensor) -> torch.Tensor:
    """``[C_out, C_in, 1, 1]`` 1x1-conv weight as a ``[C_in, C_out]`` matrix for ``x @ W``."""
    return conv_weight[:, :, 0, 0].t().contiguous()


@dataclass
class CachedWeights:
    """The model's weights rearranged once so that each position is a few small matmuls.

    Lists hold one entry per layer; ``N`` is the number of samples.
    """

    v_weight: list[torch.Tensor]  # vertical conv weights
    v_bias: list[torch.Tensor]  # [N, 2C, 1, 1]: conv bias + label bias of the vertical gate
    h_weight: list[torch.Tensor]  # [(p+1)*C, 2C], rows ordered (tap, channel) to match the cached window
    h_bias: list[torch.Tensor]  # [N, 1, 2C]: horizontal conv bias + link bias + label bias of the horizontal gate
    link_weight: list[torch.Tensor]  # [2C, 2C]
    out_weight: list[torch.Tensor]  # [C, C], all layers but the last (its h output feeds nothing)
    out_bias: list[torch.Tensor]  # [1, C]
    skip_weight: torch.Tensor  # [L*C, C]: the skips of all layers are summed, one matmul over all gates
    skip_bias: torch.Tensor  # [1, C]
    head: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # two 1x1 convs as (weight, bias) pairs
    cond_v: torch.Tensor | None  # [cond_channels, L*2C]: every layer's vertical conditioning projection
    cond_h: torch.Tensor | None  # [cond_channels, L*2C]: every layer's horizontal conditioning projection


def cached_weights(model: GatedPixelCNN, labels: torch.Tensor | None, n: int) -> CachedWeights:
    """Rearrange ``model``'s weights for :func:`sample_fast` (label biases folded in for ``n`` samples)."""
    c, p = model.channels, model.kernel_size // 2
    layers = list(model.layers)
    v_bias, h_bias = [], []
    for layer in layers:
        vb = layer.v_conv.conv.bias.view(1, 2 * c, 1, 1).expand(n, -1, -1, -1)
        hb = (layer.h_conv.conv.bias + layer.v_to_h.bias).view(1, 1, 2 * c).expand(n, -1, -1)
        if model.num_classes > 0:
            vb = vb + layer.cond_v(labels).view(n, 2 * c, 1, 1)
            hb = hb + layer.cond_h(labels).view(n, 1, 2 * c)
        v_bias.append(vb.contiguous())
        h_bias.append(hb.contiguous())
    head1, head2 = model.head[1], model.head[3]
    cond_v = cond_h = None
    if model.cond_channels > 0:
        cond_v = torch.cat([_matrix(layer.cond_proj_v.weight) for layer in layers], dim=1)
        cond_h = torch.cat([_matrix(layer.cond_proj_h.weight) for layer in layers], dim=1)
    return CachedWeights(
        v_weight=[layer.v_conv.conv.weight for layer in layers],
        v_bias=v_bias,
        h_weight=[
            layer.h_conv.conv.weight[:, :, 0, :].permute(2, 1, 0).reshape((p + 1) * c, 2 * c) for layer in layers
        ],
        h_bias=h_bias,
        link_weight=[_matrix(layer.v_to_h.weight) for layer in layers],
        out_weight=[_matrix(layer.h_out.weight) for layer in layers[:-1]],
        out_bias=[layer.h_out.bias.view(1, c) for layer in layers[:-1]],
        skip_weight=torch.cat([_matrix(layer.h_skip.weight) for layer in layers], dim=0),
        skip_bias=torch.stack([layer.h_skip.bias for layer in layers]).sum(0).view(1, c),
        head=(_matrix(head1.weight), head1.bias.view(1, -1), _matrix(head2.weight), head2.bias.view(1, -1)),
        cond_v=cond_v,
        cond_h=cond_h,
    )


def _cond_row(cond: torch.Tensor | None, projection: torch.Tensor | None, row: int) -> torch.Tensor | None:
    """One row of conditioning features projected for every layer: ``[N, W, L*2C]`` (None without)."""
    if cond is None:
        return None
    return torch.matmul(cond[:, :, row].transpose(1, 2), projection)


def row_links(
    model: GatedPixelCNN,
    w: CachedWeights,
    v_in: list[torch.Tensor],
    codes: torch.Tensor,
    cond: torch.Tensor | None,
    i: int,
) -> list[torch.Tensor]:
    """Run the vertical stack on row ``i - 1`` and return what every layer's horizontal gate gets at row ``i``.

    Args:
        model: the prior.
        w: its rearranged weights.
        v_in: per-layer vertical-stack inputs ``[N, C, H + p, W + 2p]`` (zero padded like ``VerticalConv``);
            row ``i - 1`` of every layer is filled in here.
        codes: ``[N, H, W]``, complete up to row ``i - 1``.
        cond: conditioning features ``[N, cond_channels, H, W]`` or None.
        i: the row about to be sampled.

    Returns:
        Per layer ``[N, W, 2C]``: link from the row above, horizontal biases and row ``i``'s conditioning.
    """
    n, width = codes.shape[0], codes.shape[2]
    p, two_c = model.kernel_size // 2, 2 * model.channels
    cond_h = _cond_row(cond, w.cond_h, i)
    links = []
    if i == 0:
        # the down-shifted vertical features of row -1 are zeros: only biases remain
        links = [hb.expand(n, width, two_c) for hb in w.h_bias]
    else:
        cond_v = _cond_row(cond, w.cond_v, i - 1)
        v_in[0][:, :, i - 1 + p, p : p + width] = model.embedding.weight[codes[:, i - 1]].transpose(1, 2)
        for layer_idx in range(model.num_layers):
            window = v_in[layer_idx][:, :, i - 1 : i + p]  # rows i-1-p .. i-1 (padded coords)
            v_pre = (F.conv2d(window, w.v_weight[layer_idx]) + w.v_bias[layer_idx])[:, :, 0]  # [N, 2C, W]
            if cond_v is not None:
                v_pre = v_pre + cond_v[..., layer_idx * two_c : (layer_idx + 1) * two_c].transpose(1, 2)
            links.append(torch.matmul(v_pre.transpose(1, 2), w.link_weight[layer_idx]) + w.h_bias[layer_idx])
            if layer_idx + 1 < model.num_layers:
                a, b = v_pre.chunk(2, dim=1)
                v_in[layer_idx + 1][:, :, i - 1 + p, p : p + width] = torch.tanh(a) * torch.sigmoid(b)
    if cond_h is not None:
        links = [link + cond_h[..., k * two_c : (k + 1) * two_c] for k, link in enumerate(links)]
    return [link.contiguous() for link in links]


def position_logits(
    model: GatedPixelCNN,
    w: CachedWeights,
    h_in: list[torch.Tensor],
    gates: torch.Tensor,
    links: list[torch.Tensor],
    j: int,
) -> torch.Tensor:
    """Run the horizontal stack and the head at column ``j`` of the current row.

    Args:
        model: the prior.
        w: its rearranged weights.
        h_in: per-layer horizontal-stack inputs of the row, ``[N, W + p + 1, C]``, column ``j`` at ``j + p + 1``;
            column ``j`` of layers ``1..L-1`` is filled in here.
        gates: scratch ``[N, L*C]`` for the gated outputs of all layers.
        links: from :func:`row_links`.
        j: the column.

    Returns:
        Logits ``[N, K]``.
    """
    c, pad = model.channels, model.kernel_size // 2 + 1
    n = gates.shape[0]
    for layer_idx in range(model.num_layers):
        # mask A reads columns j-1-p .. j-1, mask B reads j-p .. j
        start = j if layer_idx == 0 else j + 1
        window = h_in[layer_idx][:, start : start + pad].reshape(n, -1)  # a view
        pre = torch.addmm(links[layer_idx][:, j], window, w.h_weight[layer_idx])
        g = gates[:, layer_idx * c : (layer_idx + 1) * c]
        torch.mul(torch.tanh(pre[:, :c]), torch.sigmoid(pre[:, c:]), out=g)
        if layer_idx + 1 < model.num_layers:  # the last layer's h output only feeds its skip
            h_out = torch.addmm(w.out_bias[layer_idx], g, w.out_weight[layer_idx])
            if layer_idx > 0:
                h_out += h_in[layer_idx][:, j + pad]
            h_in[layer_idx + 1][:, j + pad] = h_out
    head1_weight, head1_bias, head2_weight, head2_bias = w.head
    hidden = torch.addmm(w.skip_bias, gates, w.skip_weight).relu_()
    hidden = torch.addmm(head1_bias, hidden, head1_weight).relu_()
    return torch.addmm(head2_bias, hidden, head2_weight)


@dataclass
class CacheBuffers:
    """The per-layer activation caches of incremental sampling for ``N`` maps of ``H x W`` codes.

    ``v_in`` holds every layer's vertical-stack input ``[N, C, H + p, W + 2p]``, zero padded like ``VerticalConv``
    (``p`` rows on top, ``p`` columns on each side); only rows ``r-1-p .. r-1`` are read when row ``r`` starts.
    ``h_in`` holds every layer's horizontal-stack input of the current row ``[N, W + p + 1, C]``, channels last, with
    ``p + 1`` zero columns on the left: column ``j`` lives at index ``j + p + 1``; columns < 0 stay zero and columns
    > ``j`` are never read. ``gates`` ``[N, L*C]`` is scratch for the gated outputs of all layers.
    """

    v_in: list[torch.Tensor]
    h_in: list[torch.Tensor]
    gates: torch.Tensor


def cache_buffers(model: GatedPixelCNN, n: int, height: int, width: int, device: torch.device) -> CacheBuffers:
    """Zeroed :class:`CacheBuffers` for ``n`` maps of ``height x width`` codes of ``model``."""
    dtype = next(model.parameters()).dtype
    c, p = model.channels, model.kernel_size // 2
    return CacheBuffers(
        v_in=[torch.zeros(n, c, height + p, width + 2 * p, dtype=dtype, device=device) for _ in model.layers],
        h_in=[torch.zeros(n, width + p + 1, c, dtype=dtype, device=device) for _ in model.layers],
        gates=torch.empty(n, model.num_layers * c, dtype=dtype, device=device),
    )


class RowSampler:
    """One row's horizontal pass: at each column, the horizontal stacks, the head and the pick of a code.

    Everything the pass reads and writes lives in fixed buffers (the row's links and uniforms are copied in), so
    :meth:`capture` can record it as one CUDA graph that every later row replays; without a graph the same pass
    runs eagerly.

    Args:
        model: the prior, in eval mode.
        weights: its :func:`cached_weights`.
        buffers: the sampler's :class:`CacheBuffers` (its ``h_in`` and ``gates`` are used).
        width: columns of the code map.
        temperature: softmax temperature; 0 means argmax.
        keep_logits: also keep the row's logits in :attr:`logits`.
    """

    def __init__(
        self,
        model: GatedPixelCNN,
        weights: CachedWeights,
        buffers: CacheBuffers,
        width: int,
        temperature: float,
        keep_logits: bool = False,
    ) -> None:
        n, device, dtype = buffers.gates.shape[0], buffers.gates.device, buffers.gates.dtype
        self.model, self.weights, self.buffers = model, weights, buffers
        self.width, self.temperature = width, temperature
        self.links = [torch.zeros(n, width, 2 * model.channels, dtype=dtype, device=device) for _ in model.layers]
        self.u = torch.zeros(width, n, dtype=torch.float64, device=device)
        self.codes = torch.zeros(n, width, dtype=torch.long, device=device)
        self.logits = torch.zeros(n, model.num_embeddings, width, dtype=dtype, device=device) if keep_logits else None
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def run(self) -> None:
        """The pass itself, over :attr:`links` and :attr:`u`, into :attr:`codes` (and :attr:`logits`)."""
        h_in, pad = self.buffers.h_in, self.model.kernel_size // 2 + 1
        for j in range(self.width):
            logits = position_logits(self.model, self.weights, h_in, self.buffers.gates, self.links, j)
            new = pick_codes(logits, self.u[j], self.temperature)
            self.codes[:, j] = new
            h_in[0][:, j + pad] = self.model.embedding.weight[new]
            if self.logits is not None:
                self.logits[:, :, j] = logits

    def capture(self) -> None:
        """Record :meth:`run` as a CUDA graph, after one warm-up pass on a side stream as CUDA graphs require.

        The passes write only columns that every row writes again before reading them, so they leave no trace.
        """
        device = self.codes.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run()
        self.graph = graph

    def __call__(self, links: list[torch.Tensor], u_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample one row.

        Args:
            links: from :func:`row_links` for this row.
            u_row: the row's uniforms ``[W, N]``.

        Returns:
            ``(codes [N, W], logits [N, K, W] or None)``, buffers that the next row overwrites.
        """
        for buffer, link in zip(self.links, links):
            buffer.copy_(link)
        self.u.copy_(u_row)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run()
        return self.codes, self.logits


def graph_if_possible(row: RowSampler, use_graph: bool) -> RowSampler:
    """Capture ``row`` as a CUDA graph when ``use_graph``; if capture fails, log why and keep the eager pass."""
    if use_graph:
        try:
            row.capture()
        except RuntimeError as error:  # torch raises its CUDA, capture and memory errors as RuntimeError
            logger.warning(f"Sampling without a CUDA graph: capturing the row pass failed ({error}).")
    return row


@torch.no_grad()
def sample_fast(
    model: GatedPixelCNN,
    shape: Sequence[int],
    num_samples: int,
    temperature: float = 1.0,
    labels: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    return_logits: bool = False,
    cond_codes: torch.Tensor | None = None,
    cuda_graph: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample code maps incrementally with cached activations; same result as :func:`sample_naive`.

    Arguments and return values are those of :func:`sample_naive` (there is no ``max_positions``: the whole map
    costs about one forward pass), and ``cuda_graph``: on a CUDA device, replay each row's pass as a CUDA graph
    (see :class:`RowSampler`); False runs it eagerly. Ignored on other devices.
    """
    device, labels, u = _prepare(model, shape, num_samples, temperature, labels, generator, device)
    height, width = int(shape[0]), int(shape[1])
    with eval_on(model, device):
        cond = condition_features(model, cond_codes, num_samples, shape, device)
        weights = cached_weights(model, labels, num_samples)
        buffers = cache_buffers(model, num_samples, height, width, device)
        row = RowSampler(model, weights, buffers, width, temperature, keep_logits=return_logits)
        row = graph_if_possible(row, cuda_graph and device.type == "cuda")
        codes = torch.zeros(num_samples, height, width, dtype=torch.long, device=device)
        all_logits = None
        if return_logits:
            logits_shape = (num_samples, model.num_embeddings, height, width)
            all_logits = torch.zeros(logits_shape, dtype=buffers.gates.dtype, device=device)
        for i in range(height):
            row_codes, row_logits = row(row_links(model, weights, buffers.v_in, codes, cond, i), u[i])
            codes[:, i] = row_codes
            if all_logits is not None:
                all_logits[:, :, i] = row_logits
    return (codes, all_logits) if return_logits else codes


def sample_fast_eager(*args: object, **kwargs: object) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_fast` without CUDA graphs (the eager pass on every device)."""
    return sample_fast(*args, **kwargs, cuda_graph=False)


SAMPLERS = {"fast": sample_fast, "fast_eager": sample_fast_eager, "naive": sample_naive}


def sample_level(
    model: GatedPixelCNN,
    shape: Sequence[int],
    num_samples: int,
    temperature: float = 1.0,
    labels: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    method: str = "fast",
    device: torch.device | str | None = None,
    cond_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample code maps of one level with the chosen sampler.

    Args:
        model: the prior of that level.
        shape: ``(H, W)`` of the code map.
        num_samples: number of maps ``N``.
        temperature: softmax temperature; 0 means argmax.
        labels: int64 ``[N]`` (or one int for all) for a class-conditioned model, else None.
        generator: random generator.
        method: ``"fast"`` (cached, incremental; rows replayed as CUDA graphs on a GPU), ``"fast_eager"`` (the same
            without CUDA graphs) or ``"naive"`` (a full pass per position).
        device: where to run; defaults to the model's device.
        cond_codes: integer ``[N, h, w]`` for a spatially conditioned model, else None.

    Returns:
        int64 codes ``[N, H, W]``.
    """
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {sorted(SAMPLERS)}, got {method!r}.")
    return SAMPLERS[method](model, shape, num_samples, temperature, labels, generator, device, cond_codes=cond_codes)


def level_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Two independent CPU generators, for the top and the bottom level, derived from one seed.

    Args:
        seed: the sampling seed.

    Returns:
        ``(top_generator, bottom_generator)``.
    """
    seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(seed))
    return torch.Generator().manual_seed(int(seeds[0])), torch.Generator().manual_seed(int(seeds[1]))


def sample_codes(
    prior: TwoLevelPrior,
    top_shape: Sequence[int],
    bottom_shape: Sequence[int],
    num_samples: int,
    temperature: float = 1.0,
    seed: int = 0,
    labels: torch.Tensor | int | None = None,
    sampler: str = "fast",
    device: torch.device | str | None = None,
    generators: tuple[torch.Generator, torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample two-level code maps: the top map, then the bottom map conditioned on it.

    Args:
        prior: the two-level prior (``top`` and ``bottom`` Gated PixelCNNs).
        top_shape: ``(h_t, w_t)``.
        bottom_shape: ``(h_b, w_b)``, a multiple of ``top_shape``.
        num_samples: number of map pairs ``N``.
        temperature: softmax temperature of both levels; 0 means argmax.
        seed: seeds :func:`level_generators` when ``generators`` is None.
        labels: int64 ``[N]`` (or one int for all) for a class-conditioned prior, else None.
        sampler: ``"fast"``, ``"fast_eager"`` or ``"naive"`` (see :func:`sample_level`).
        device: where to run; defaults to the prior's device.
        generators: ``(top, bottom)`` generators to draw from instead of fresh ones from ``seed`` (to continue
            a stream across batches).

    Returns:
        ``(top_codes [N, h_t, w_t], bottom_codes [N, h_b, w_b])``, int64.
    """
    top_generator, bottom_generator = generators if generators is not None else level_generators(seed)
    top = sample_level(prior.top, top_shape, num_samples, temperature, labels, top_generator, sampler, device)
    bottom = sample_level(
        prior.bottom, bottom_shape, num_samples, temperature, labels, bottom_generator, sampler, device, cond_codes=top
    )
    return top, bottom
