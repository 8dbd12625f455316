"""Sampling code maps from a :class:`~bundle.stage2_prior.pixelcnn.GatedPixelCNN` prior.

Two samplers that return exactly the same code maps for the same weights and seed:

* :func:`sample_naive` runs one full forward pass per position (``H * W`` passes).
* :func:`sample_fast` generates incrementally with per-layer caches (Ramachandran et
  al. 2017, "Fast Generation for Convolutional Autoregressive Models"). When a row
  starts, the vertical stack is computed for the row above only (it depends on rows
  that are complete); then, for each column, the horizontal stack of every layer is
  computed at that single position from the cached left context of the layer's input,
  followed by the output head. The total work is about one full forward pass.

Exactness: the full convolution and the cached computation may differ in the last
bits of floating point, so both samplers draw all randomness up front in a fixed
order (``u = torch.rand(N, H, W)``) and pick each code by inverse CDF on the softmax
(the first code whose cumulative probability exceeds ``u``), computed in float64.
A rounding difference can then only change a sample if ``u`` falls within rounding
distance of a CDF boundary. ``temperature=0`` means argmax (greedy decoding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bundle.stage2_prior.pixelcnn import GatedPixelCNN

__all__ = ["sample_naive", "sample_fast", "sample_codes"]


def _pick_codes(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
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
    shape: tuple[int, int],
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


@contextlib.contextmanager
def _eval_on(model: GatedPixelCNN, device: torch.device) -> Iterator[None]:
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
    shape: tuple[int, int],
    num_samples: int,
    temperature: float = 1.0,
    labels: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    return_logits: bool = False,
    max_positions: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample code maps with one full forward pass per position.

    Args:
        model: the prior.
        shape: ``(H, W)`` of the code map.
        num_samples: number of maps ``N``.
        temperature: softmax temperature; 0 means argmax.
        labels: int64 ``[N]`` (or one int for all) for a conditioned model, else None.
        generator: random generator; uniforms are drawn on its device (CPU if None).
        device: where to run; defaults to the model's device (the model is moved
            there for the call and moved back afterwards).
        return_logits: also return the logits used at every position.
        max_positions: stop after this many positions in raster order, leaving the rest 0
            (for timing a prefix: every position costs one full forward pass).

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
    with _eval_on(model, device):
        for i, j in positions:
            # positions >= (i, j) still hold 0; causality makes them irrelevant here
            logits = model(codes, labels)[:, :, i, j]
            codes[:, i, j] = _pick_codes(logits, u[i, j], temperature)
            if all_logits is not None:
                all_logits[:, :, i, j] = logits
    return (codes, all_logits) if return_logits else codes


def _matrix(conv_weight: torch.Tensor) -> torch.Tensor:
    """``[C_out, C_in, 1, 1]`` 1x1-conv weight as a ``[C_in, C_out]`` matrix for ``x @ W``."""
    return conv_weight[:, :, 0, 0].t().contiguous()


@torch.no_grad()
def sample_fast(
    model: GatedPixelCNN,
    shape: tuple[int, int],
    num_samples: int,
    temperature: float = 1.0,
    labels: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample code maps incrementally with cached activations; same result as :func:`sample_naive`.

    Arguments and return values are those of :func:`sample_naive` (there is no ``max_positions``: the whole map
    costs about one forward pass).
    """
    device, labels, u = _prepare(model, shape, num_samples, temperature, labels, generator, device)
    height, width = int(shape[0]), int(shape[1])
    n = num_samples
    with _eval_on(model, device):
        dtype = next(model.parameters()).dtype
        c = model.channels
        p = model.kernel_size // 2
        num_layers = model.num_layers
        layers = list(model.layers)
        emb = model.embedding.weight  # [K, C]

        # ---- weights rearranged once so each position is a few small matmuls ----
        v_weight = [layer.v_conv.conv.weight for layer in layers]
        v_bias = []  # [N, 2C, 1, 1]: conv bias + label bias of the vertical gate
        h_weight = []  # [(p+1)*C, 2C], rows ordered (tap, channel) to match the cached window
        h_bias = []  # [N, 1, 2C]: horizontal conv bias + link bias + label bias of the horizontal gate
        link_weight = [_matrix(layer.v_to_h.weight) for layer in layers]
        # the last layer has no h_out: its horizontal output would feed nothing
        out_weight = [_matrix(layer.h_out.weight) for layer in layers[:-1]]
        out_bias = [layer.h_out.bias.view(1, c) for layer in layers[:-1]]
        for layer in layers:
            vb = layer.v_conv.conv.bias.view(1, 2 * c, 1, 1).expand(n, -1, -1, -1)
            hb = (layer.h_conv.conv.bias + layer.v_to_h.bias).view(1, 1, 2 * c).expand(n, -1, -1)
            if model.num_classes > 0:
                vb = vb + layer.cond_v(labels).view(n, 2 * c, 1, 1)
                hb = hb + layer.cond_h(labels).view(n, 1, 2 * c)
            v_bias.append(vb.contiguous())
            h_bias.append(hb.contiguous())
            h_weight.append(layer.h_conv.conv.weight[:, :, 0, :].permute(2, 1, 0).reshape((p + 1) * c, 2 * c))
        # the skips of all layers are summed, so one matmul over the concatenated gates does it
        skip_weight = torch.cat([_matrix(layer.h_skip.weight) for layer in layers], dim=0)  # [L*C, C]
        skip_bias = torch.stack([layer.h_skip.bias for layer in layers]).sum(0).view(1, c)
        head1, head2 = model.head[1], model.head[3]
        head1_weight, head1_bias = _matrix(head1.weight), head1.bias.view(1, -1)
        head2_weight, head2_bias = _matrix(head2.weight), head2.bias.view(1, -1)

        # ---- caches ----
        # vertical-stack inputs of every layer, zero padded like VerticalConv (p rows on top, p columns
        # on each side); only rows r-1-p .. r-1 are read when row r starts
        v_in = [torch.zeros(n, c, height + p, width + 2 * p, dtype=dtype, device=device) for _ in range(num_layers)]
        # horizontal-stack inputs of the current row, channels last, p+1 zero columns on the left;
        # column j lives at index j + p + 1. Columns < 0 stay zero; columns > j are never read.
        pad = p + 1
        h_in = [torch.zeros(n, width + pad, c, dtype=dtype, device=device) for _ in range(num_layers)]
        gates = torch.empty(n, num_layers * c, dtype=dtype, device=device)  # gated h outputs at the position
        codes = torch.zeros(n, height, width, dtype=torch.long, device=device)
        all_logits = None
        if return_logits:
            all_logits = torch.zeros(n, model.num_embeddings, height, width, dtype=dtype, device=device)

        for i in range(height):
            # ---- vertical stack of row i-1 -> link into the horizontal stack of row i ----
            if i == 0:
                # the down-shifted vertical features of row -1 are zeros: only biases remain
                link = [hb.expand(n, width, 2 * c).contiguous() for hb in h_bias]
            else:
                v_in[0][:, :, i - 1 + p, p : p + width] = emb[codes[:, i - 1]].transpose(1, 2)
                link = []
                for layer_idx in range(num_layers):
                    window = v_in[layer_idx][:, :, i - 1 : i + p]  # rows i-1-p .. i-1 (padded coords)
                    v_pre = (F.conv2d(window, v_weight[layer_idx]) + v_bias[layer_idx])[:, :, 0]  # [N, 2C, W]
                    link.append(torch.matmul(v_pre.transpose(1, 2), link_weight[layer_idx]) + h_bias[layer_idx])
                    if layer_idx + 1 < num_layers:
                        a, b = v_pre.chunk(2, dim=1)
                        v_in[layer_idx + 1][:, :, i - 1 + p, p : p + width] = torch.tanh(a) * torch.sigmoid(b)

            # ---- horizontal stack and head, one position at a time ----
            for j in range(width):
                for layer_idx in range(num_layers):
                    # mask A reads columns j-1-p .. j-1, mask B reads j-p .. j
                    start = j if layer_idx == 0 else j + 1
                    window = h_in[layer_idx][:, start : start + p + 1].reshape(n, -1)  # a view
                    pre = torch.addmm(link[layer_idx][:, j], window, h_weight[layer_idx])
                    g = gates[:, layer_idx * c : (layer_idx + 1) * c]
                    torch.mul(torch.tanh(pre[:, :c]), torch.sigmoid(pre[:, c:]), out=g)
                    if layer_idx + 1 < num_layers:  # the last layer's h output only feeds its skip
                        h_out = torch.addmm(out_bias[layer_idx], g, out_weight[layer_idx])
                        if layer_idx > 0:
                            h_out += h_in[layer_idx][:, j + pad]
                        h_in[layer_idx + 1][:, j + pad] = h_out
                hidden = torch.addmm(skip_bias, gates, skip_weight).relu_()
                hidden = torch.addmm(head1_bias, hidden, head1_weight).relu_()
                logits = torch.addmm(head2_bias, hidden, head2_weight)
                new = _pick_codes(logits, u[i, j], temperature)
                codes[:, i, j] = new
                h_in[0][:, j + pad] = emb[new]
                if all_logits is not None:
                    all_logits[:, :, i, j] = logits
    return (codes, all_logits) if return_logits else codes


def sample_codes(
    model: GatedPixelCNN,
    shape: tuple[int, int],
    num_samples: int,
    temperature: float = 1.0,
    labels: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    method: str = "fast",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample code maps with the chosen sampler.

    Args:
        model: the prior.
        shape: ``(H, W)`` of the code map.
        num_samples: number of maps ``N``.
        temperature: softmax temperature; 0 means argmax.
        labels: int64 ``[N]`` (or one int for all) for a conditioned model, else None.
        generator: random generator.
        method: ``"fast"`` (cached, incremental) or ``"naive"`` (a full pass per position).
        device: where to run; defaults to the model's device.

    Returns:
        int64 codes ``[N, H, W]``.
    """
    samplers = {"fast": sample_fast, "naive": sample_naive}
    if method not in samplers:
        raise ValueError(f"method must be one of {sorted(samplers)}, got {method!r}.")
    return samplers[method](model, shape, num_samples, temperature, labels, generator, device)
