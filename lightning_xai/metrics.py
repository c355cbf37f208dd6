"""Faithfulness, localisation and class-discrimination metrics for saliency maps, batched on tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BASELINES",
    "baseline_images",
    "class_discrimination",
    "deletion_insertion",
    "localization",
    "perturbation_test",
]

#: Baseline kinds accepted by :func:`baseline_images`.
BASELINES: tuple[str, ...] = ("blur", "zero", "mean")

#: Default removal fractions of the Chefer perturbation test.
DEFAULT_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

_BLUR_KERNEL_SIZE = 11
_BLUR_SIGMA = 5.0

ModelFn = Callable[[Tensor], Tensor]
ProbabilityFn = Callable[[Tensor], Tensor]  # logits (N, classes) -> probabilities (N, classes)


# --------------------------------------------------------------------------------------------------------------------
# Localisation
# --------------------------------------------------------------------------------------------------------------------


def _as_bool_mask(masks: Tensor) -> Tensor:
    """Boolean view of a bool or 0/1 mask (values > 0.5 count as foreground)."""
    if masks.dtype == torch.bool:
        return masks
    return masks > 0.5


def localization(maps: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Localisation scores of saliency maps against ground-truth masks.

    Args:
        maps: ``(..., H, W)`` float maps; any leading dims, e.g. ``(B, H, W)`` or ``(B, K, H, W)``.
        masks: bool or 0/1 masks of the same shape as ``maps`` (or broadcastable to it).

    Returns:
        A dict of float32 tensors, each of the leading shape ``maps.shape[:-2]``:

        - ``"iou"``: IoU of the map thresholded at its own mean (pixel > mean is foreground, Chefer's
          convention) with the mask; 0 when the union is empty.
        - ``"pixel_accuracy"``: fraction of pixels where the thresholded map agrees with the mask.
        - ``"average_precision"``: AP of ranking pixels by map value against the mask labels, i.e. the mean
          over positive pixels of the precision at each positive's rank. Pixels are sorted descending with a
          *stable* sort, so tied values are ranked in flattened (row-major) pixel order. 0 for an empty mask.
        - ``"pointing_game"``: 1.0 if the argmax pixel (the first maximum in row-major order) is in the mask.
        - ``"energy_pointing_game"``: ``sum(relu(map) * mask) / sum(relu(map))``; an all-zero (or all
          non-positive) map scores the mask's area fraction, the value of a uniform map.

    Raises:
        ValueError: if ``maps`` has fewer than 2 dims or ``masks`` does not broadcast to ``maps.shape``.
    """
    if maps.dim() < 2:
        raise ValueError(f"maps must have at least 2 dims (..., H, W), got shape {tuple(maps.shape)}")
    try:
        shape = torch.broadcast_shapes(maps.shape, masks.shape)
    except RuntimeError:
        shape = None
    if shape != maps.shape:
        raise ValueError(
            f"masks of shape {tuple(masks.shape)} do not match (or broadcast to) maps of shape {tuple(maps.shape)}"
        )

    m = maps.float().flatten(-2)  # (..., N)
    mk = _as_bool_mask(masks).to(m.device).expand(maps.shape).flatten(-2)  # (..., N)
    n_pix = m.shape[-1]

    # Thresholded map: IoU and pixel accuracy. The mean is taken in float64 so that a constant map is never
    # "above its own mean" through float32 rounding.
    m64 = m.double()
    fg = m64 > m64.mean(dim=-1, keepdim=True)
    inter = (fg & mk).sum(-1).float()
    union = (fg | mk).sum(-1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(union))
    pixel_accuracy = (fg == mk).float().mean(-1)

    # Average precision of the soft map (stable descending sort: ties keep row-major order).
    order = m.argsort(dim=-1, descending=True, stable=True)
    labels = mk.gather(-1, order).float()
    ranks = torch.arange(1, n_pix + 1, device=m.device, dtype=torch.float32)
    precision = labels.cumsum(-1) / ranks
    n_pos = labels.sum(-1)
    ap = torch.where(n_pos > 0, (precision * labels).sum(-1) / n_pos.clamp_min(1.0), torch.zeros_like(n_pos))

    # Pointing game: argmax returns the first maximum.
    top = m.argmax(dim=-1, keepdim=True)
    pointing = mk.gather(-1, top).squeeze(-1).float()

    # Energy pointing game.
    pos = m.clamp_min(0)
    total = pos.sum(-1)
    inside = (pos * mk).sum(-1)
    area = mk.float().mean(-1)
    energy = torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float32).tiny), area)

    return {
        "iou": iou.float(),
        "pixel_accuracy": pixel_accuracy.float(),
        "average_precision": ap.float(),
        "pointing_game": pointing.float(),
        "energy_pointing_game": energy.float(),
    }


def class_discrimination(maps: Tensor, masks: Tensor) -> Tensor:
    """Class discrimination on images holding objects of two classes.

    Args:
        maps: ``(B, 2, H, W)``; map ``k`` explains the class of object ``k``.
        masks: ``(B, 2, H, W)`` bool or 0/1; mask ``k`` covers object ``k``.

    Returns:
        ``(B, 2)`` float32: the positive energy (``clamp_min(0)``) of map ``k`` on mask ``k`` divided by its
        energy on the union of both masks; 0.5 when the map has no energy on either object.

    Raises:
        ValueError: if either tensor is not ``(B, 2, H, W)`` or their shapes differ.
    """
    if maps.dim() != 4 or maps.shape[1] != 2:
        raise ValueError(f"maps must have shape (B, 2, H, W), got {tuple(maps.shape)}")
    if masks.shape != maps.shape:
        raise ValueError(f"masks shape {tuple(masks.shape)} must equal maps shape {tuple(maps.shape)}")
    pos = maps.float().clamp_min(0)
    mk = _as_bool_mask(masks).to(pos.device)
    both = (mk[:, 0] | mk[:, 1]).unsqueeze(1)  # (B, 1, H, W)
    own = (pos * mk).sum((-2, -1))
    on_objects = (pos * both).sum((-2, -1))
    ratio = own / on_objects.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(on_objects > 0, ratio, torch.full_like(ratio, 0.5)).float()


# --------------------------------------------------------------------------------------------------------------------
# Perturbation metrics
# --------------------------------------------------------------------------------------------------------------------


def _gaussian_kernel1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian kernel of shape ``(size,)``."""
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype)


def baseline_images(images: Tensor, kind: str = "blur") -> Tensor:
    """Baseline ("removed pixel") images for perturbation metrics.

    Args:
        images: ``(B, C, H, W)`` float images.
        kind: ``"blur"`` (separable Gaussian blur, kernel 11, sigma 5, reflect padding, or replicate padding when
            a side is shorter than 6 pixels), ``"zero"`` (all zeros) or ``"mean"`` (per-image, per-channel mean).

    Returns:
        ``(B, C, H, W)`` baseline of the same dtype and device as ``images``.

    Raises:
        ValueError: for an unknown ``kind`` or if ``images`` is not 4-D.
    """
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; options are {', '.join(repr(b) for b in BASELINES)}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "mean":
        return images.mean(dim=(-2, -1), keepdim=True).expand_as(images).contiguous()

    _, c, h, w = images.shape
    half = _BLUR_KERNEL_SIZE // 2
    mode = "reflect" if min(h, w) > half else "replicate"
    k = _gaussian_kernel1d(_BLUR_KERNEL_SIZE, _BLUR_SIGMA, images.dtype, images.device)
    padded = F.pad(images, (half, half, half, half), mode=mode)
    out = F.conv2d(padded, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # along W
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # along H
    return out


def _pixel_ranks(flat_maps: Tensor, descending: bool = True) -> Tensor:
    """Rank of every pixel, ``(B, N)`` long; rank 0 is perturbed first. Ties keep pixel order (stable sort)."""
    order = flat_maps.argsort(dim=1, descending=descending, stable=True)
    positions = torch.arange(flat_maps.shape[1], device=flat_maps.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _keep_mask(ranks: Tensor, counts: Tensor) -> Tensor:
    """Keep-mask for perturbation steps.

    Args:
        ranks: ``(n, N)`` pixel ranks (rank 0 is perturbed first).
        counts: ``(n,)`` number of pixels perturbed in each row.

    Returns:
        ``(n, N)`` bool, True for pixels that keep their *unperturbed* source (rank >= count).
    """
    return ranks >= counts.unsqueeze(-1)


def _prepare_maps(maps: Tensor, images: Tensor) -> Tensor:
    """Check ``maps`` against ``images`` and return ``(B, H*W)`` float maps at image resolution."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3 or maps.shape[0] != b:
        raise ValueError(
            f"maps must have shape (B, H, W) or (B, 1, H, W) with B={b}, got {tuple(maps.shape)} "
            f"for images of shape {tuple(images.shape)}"
        )
    maps = maps.float().to(images.device)
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
    return maps.flatten(1)


def _check_targets(targets: Tensor, batch: int) -> None:
    """Validate a ``(B,)`` integer target tensor (upper bound is checked once logits are known)."""
    if targets.shape != (batch,):
        raise ValueError(f"targets must have shape ({batch},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if batch and int(targets.min()) < 0:
        raise ValueError("targets must be non-negative class indices")


def _perturbed_scores(
    model_fn: ModelFn,
    sources: tuple[Tensor, Tensor],
    ranks: Tensor,
    counts: Tensor,
    targets: Tensor,
    batch_size: int,
    probabilities: ProbabilityFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Score every (image, step) pair, building perturbed images chunk by chunk.

    Args:
        model_fn: ``(n, C, H, W)`` -> logits ``(n, classes)``.
        sources: ``(kept, replaced)``, both ``(B, C, H, W)``; pixels with rank < count come from ``replaced``.
        ranks: ``(B, H*W)`` pixel ranks.
        counts: ``(S,)`` number of perturbed pixels per step.
        targets: ``(B,)`` target classes.
        batch_size: number of perturbed images per ``model_fn`` call.
        probabilities: logits ``(n, classes)`` -> probabilities; default softmax.

    Returns:
        ``(probability, correct)``, both ``(B, S)``: float32 probability of the target and bool
        ``argmax == target``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kept, replaced = sources
    b, c, h, w = kept.shape
    s = counts.numel()
    total = b * s
    targets = targets.to(kept.device)
    counts = counts.to(kept.device)
    probs = torch.empty(total, dtype=torch.float32, device=kept.device)
    correct = torch.empty(total, dtype=torch.bool, device=kept.device)
    with torch.no_grad():
        for start in range(0, total, batch_size):
            flat = torch.arange(start, min(start + batch_size, total), device=kept.device)
            img, step = flat // s, flat % s
            keep = _keep_mask(ranks[img], counts[step]).view(-1, 1, h, w)
            perturbed = torch.where(keep, kept[img], replaced[img])
            logits = model_fn(perturbed)
            if logits.dim() != 2 or logits.shape[0] != flat.numel():
                raise ValueError(f"model_fn must return logits (N, classes), got {tuple(logits.shape)}")
            tgt = targets[img]
            if int(tgt.max()) >= logits.shape[1]:
                raise ValueError(f"targets must be < number of classes ({logits.shape[1]})")
            logits = logits.float()
            probs[flat] = (logits.softmax(-1) if probabilities is None else probabilities(logits)).gather(
                1, tgt.unsqueeze(1)).squeeze(1)
            correct[flat] = logits.argmax(-1) == tgt
    return probs.view(b, s), correct.view(b, s)


def deletion_insertion(
    model_fn: ModelFn,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    n_steps: int = 50,
    baseline: str = "blur",
    batch_size: int = 64,
    probabilities: ProbabilityFn | None = None,
) -> dict[str, Tensor]:
    """RISE-style deletion and insertion curves.

    Pixels of each image are ranked by map value, descending (stable sort: ties keep row-major order). At step
    ``s`` in ``0..n_steps`` the first ``round(s / n_steps * H * W)`` ranked pixels are replaced by the baseline
    (deletion), or copied from the image into the baseline (insertion). The score is the probability of the
    target class (softmax, or ``probabilities(logits)`` for sigmoid heads); all ``B * (n_steps + 1)`` perturbed
    images are built and evaluated in chunks of ``batch_size`` under ``torch.no_grad()``.

    Args:
        model_fn: maps ``(N, C, H, W)`` images to logits ``(N, classes)``.
        images: ``(B, C, H, W)``.
        maps: ``(B, H, W)`` or ``(B, 1, H, W)``; bilinearly resized if not at image resolution.
        targets: ``(B,)`` long class indices.
        n_steps: number of steps (>= 1); curves have ``n_steps + 1`` points.
        baseline: baseline kind, see :func:`baseline_images`.
        batch_size: perturbed images per ``model_fn`` call.
        probabilities: logits ``(N, classes)`` -> probabilities ``(N, classes)``; default softmax (pass
            ``ModelHandle.probabilities`` for binary and multi-label heads).

    Returns:
        ``{"deletion": (B, n_steps + 1), "insertion": (B, n_steps + 1), "deletion_auc": (B,),
        "insertion_auc": (B,)}``, float32; AUC is the mean of the curve over its points.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    flat_maps = _prepare_maps(maps, images)
    _check_targets(targets, images.shape[0])
    base = baseline_images(images, baseline)
    ranks = _pixel_ranks(flat_maps, descending=True)
    n_pix = flat_maps.shape[1]
    counts = torch.round(torch.arange(n_steps + 1, dtype=torch.float64) / n_steps * n_pix).long()
    deletion, _ = _perturbed_scores(model_fn, (images, base), ranks, counts, targets, batch_size, probabilities)
    insertion, _ = _perturbed_scores(model_fn, (base, images), ranks, counts, targets, batch_size, probabilities)
    return {
        "deletion": deletion,
        "insertion": insertion,
        "deletion_auc": deletion.mean(1),
        "insertion_auc": insertion.mean(1),
    }


def perturbation_test(
    model_fn: ModelFn,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    mode: str = "positive",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    baseline: str = "zero",
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Chefer et al. positive / negative perturbation test.

    For each fraction ``f`` the ``round(f * H * W)`` most relevant (``mode="positive"``) or least relevant
    (``mode="negative"``) pixels are replaced by ``baseline_images(images, baseline)``; ties are broken by a
    stable sort (row-major pixel order).

    Args:
        model_fn: maps ``(N, C, H, W)`` images to logits ``(N, classes)``.
        images: ``(B, C, H, W)``.
        maps: ``(B, H, W)`` or ``(B, 1, H, W)``; bilinearly resized if not at image resolution.
        targets: ``(B,)`` long class indices.
        mode: ``"positive"`` or ``"negative"``.
        fractions: ``S`` removal fractions in ``[0, 1]``.
        baseline: baseline kind, see :func:`baseline_images`.
        batch_size: perturbed images per ``model_fn`` call.

    Returns:
        ``{"fractions": (S,), "accuracy": (S,) share of images whose argmax still equals the target,
        "probability": (B, S) target probability, "accuracy_auc": () mean accuracy over steps,
        "probability_auc": (B,) mean probability over steps}``, all float32.
    """
    if mode not in ("positive", "negative"):
        raise ValueError(f"unknown mode {mode!r}; options are 'positive', 'negative'")
    fr = torch.as_tensor(list(fractions), dtype=torch.float64).flatten()
    if fr.numel() == 0 or bool(((fr < 0) | (fr > 1)).any()):
        raise ValueError(f"fractions must be a non-empty sequence of values in [0, 1], got {list(fractions)}")
    flat_maps = _prepare_maps(maps, images)
    _check_targets(targets, images.shape[0])
    base = baseline_images(images, baseline)
    ranks = _pixel_ranks(flat_maps, descending=mode == "positive")
    counts = torch.round(fr * flat_maps.shape[1]).long()
    probability, correct = _perturbed_scores(model_fn, (images, base), ranks, counts, targets, batch_size)
    accuracy = correct.float().mean(0)
    return {
        "fractions": fr.float().to(images.device),
        "accuracy": accuracy,
        "probability": probability,
        "accuracy_auc": accuracy.mean(),
        "probability_auc": probability.mean(1),
    }
