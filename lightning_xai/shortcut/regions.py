"""Regions and pastes, shared by the transplant check and the stamped-carrier check: each map's top pixels, a
region of one image pasted at its place (or moved) into another, and the forwards of the pasted images.

Pure functions of tensors plus a ``predict``; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: Size of each probe's region, as a fraction of the image's pixels (see ``docs/methods.md`` for how it was chosen).
DEFAULT_REGION = 0.04
#: Images per forward of the transplanted batch.
DEFAULT_CHUNK = 256

PredictFn = Callable[[Tensor], Tensor]
"""``predict(images (N, C, H, W)) -> logits (N, num_classes)``: the model's forward without gradients, in eval
mode (the callback hands its probe runner's; outside training a :class:`~lightning_xai.handle.ModelHandle`)."""


def top_regions(maps: Tensor, fraction: float = DEFAULT_REGION) -> Tensor:
    """Bool ``(B, H, W)``: each map's ``ceil(fraction * H * W)`` largest pixels (ties by lower index).

    ``maps`` is ``(B, H, W)`` or ``(B, K, H, W)`` (target ``0`` is used).
    """
    if maps.dim() == 4:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(f"maps must be (B, H, W) or (B, K, H, W), got {tuple(maps.shape)}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the region fraction must be in (0, 1), got {fraction}")
    flat = maps.flatten(1).float()
    count = max(1, math.ceil(fraction * flat.shape[1]))
    index = flat.topk(count, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, True).view(maps.shape)


def target_zero(images: Tensor, maps: Tensor, classes: Tensor, count: str = "B") -> tuple[Tensor, Tensor]:
    """The maps ``(N, H, W)`` and classes ``(N,)`` of target ``0`` for ``images`` ``(N, C, H, W)`` with their maps
    ``(N, [K,] H, W)`` and the classes ``(N,)`` or ``(N, K)`` those explain; raises naming the shapes (``count``: the
    letter the message calls ``N``)."""
    maps = maps[:, 0] if maps.dim() == 4 else maps
    classes = classes[:, 0] if classes.dim() == 2 else classes
    if images.dim() != 4 or maps.dim() != 3 or maps.shape[0] != images.shape[0] \
            or maps.shape[-2:] != images.shape[-2:] or classes.shape != maps.shape[:1]:
        raise ValueError(f"images must be ({count}, C, H, W), maps ({count}, [K,] H, W) of the same {count}, H and W, "
                         f"and classes ({count},) or ({count}, K); got {tuple(images.shape)}, {tuple(maps.shape)} "
                         f"and {tuple(classes.shape)}")
    return maps, classes


def paste(images: Tensor, regions: Tensor, donors: Tensor, recipients: Tensor,
          shifts: Tensor | None = None) -> Tensor:
    """``(M, C, H, W)``: recipient ``images[recipients[m]]`` with the pixels of ``regions[donors[m]]`` taken from
    ``images[donors[m]]``; with ``shifts`` ``(M, 2)``, donor and region are rolled by ``(dy, dx)`` first (the
    region moved to another place)."""
    donor_images, masks = images[donors], regions[donors][:, None]
    if shifts is not None:
        rows = torch.arange(images.shape[-2], device=images.device)
        cols = torch.arange(images.shape[-1], device=images.device)
        y = (rows[None, :] - shifts[:, :1].to(images.device)) % images.shape[-2]  # (M, H)
        x = (cols[None, :] - shifts[:, 1:].to(images.device)) % images.shape[-1]  # (M, W)
        m = torch.arange(len(donors), device=images.device)[:, None, None]
        donor_images = donor_images.permute(0, 2, 3, 1)[m, y[:, :, None], x[:, None, :]].permute(0, 3, 1, 2)
        masks = masks[:, 0][m, y[:, :, None], x[:, None, :]][:, None]
    return torch.where(masks.to(images.device), donor_images, images[recipients])


def predict_chunked(predict: PredictFn, images: Tensor, regions: Tensor, donors: Tensor, recipients: Tensor,
                    chunk: int, num_classes: int, shifts: Tensor | None = None) -> Tensor:
    """Softmax ``(M, num_classes)`` of every transplanted image, built and run ``chunk`` pairs at a time."""
    out = [torch.zeros(0, num_classes)]
    for start in range(0, len(donors), chunk):
        part = slice(start, start + chunk)
        batch = paste(images, regions, donors[part], recipients[part], None if shifts is None else shifts[part])
        out.append(predict(batch).float().softmax(-1).cpu())
    return torch.cat(out)


def control_shifts(count: int, height: int, width: int, seed: int = 0) -> Tensor:
    """``(count, 2)`` seeded shifts ``(dy, dx)`` of a quarter to three quarters of each side, for the control that
    pastes a region at another place (see :func:`paste`; the roll wraps around)."""
    generator = torch.Generator().manual_seed(int(seed))
    low = torch.tensor([height // 4, width // 4])
    return low + (torch.rand(count, 2, generator=generator) * (torch.tensor([height, width]) // 2 + 1)).long()
