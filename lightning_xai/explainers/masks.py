"""Masks from the last block's features and their causal scores: the machinery ViT-CX and C2F share.

Masks are the ``D`` channels of the patch tokens of ``blocks[-1].norm1``'s output, upsampled to the input
size and min-max normalised; near-duplicates are merged by complete-linkage agglomerative clustering on
cosine distance (scikit-learn). A mask ``M`` is scored with Gaussian noise ``ε`` in the input space as
``s = p_c(x ⊙ M + ε ⊙ (1 − M)) − p_c(x + ε ⊙ (1 − M)) + p_c(x)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering
from torch import Tensor

from lightning_xai.adapters import Geometry
from lightning_xai.explainers.base import minmax


def channel_masks(features: Tensor, geom: Geometry) -> Tensor:
    """``(T, D)`` norm1 output of one image -> ``(D, H, W)`` masks, each min-max normalised to ``[0, 1]``."""
    patches = features[geom.num_prefix :].float().T.unflatten(-1, geom.grid)  # (D, h, w)
    upsampled = F.interpolate(patches[None], size=geom.image_size, mode="bilinear", align_corners=False)[0]
    return minmax(upsampled)


def cosine_distances(masks: Tensor) -> np.ndarray:
    """Pairwise cosine distances of ``(D, H, W)`` masks: ``(D, D)`` float32 array for scikit-learn.

    Computed in float32 on the masks' device (one ``(D, H·W) @ (H·W, D)`` product). Exactly symmetric, zero
    on the diagonal and clamped at 0 (rounding can give near-duplicates a distance of ``-1e-7``); the float32
    rounding (about ``1e-6``) is far below the clustering thresholds' scale, so the merged masks match those
    from float64 distances (tested on trained and random models).
    """
    flat = F.normalize(masks.flatten(1).float(), dim=1)
    distances = (1.0 - flat @ flat.T).clamp_min(0)
    distances = (distances + distances.T) / 2
    return distances.fill_diagonal_(0).cpu().numpy()


def cluster_labels(distances: np.ndarray, threshold: float) -> np.ndarray:
    """Complete-linkage agglomerative clustering cut at cosine distance ``threshold``: ``(D,)`` labels."""
    if distances.shape[0] < 2:
        return np.zeros(distances.shape[0], dtype=np.int64)
    clustering = AgglomerativeClustering(
        n_clusters=None, metric="precomputed", linkage="complete", distance_threshold=threshold
    )
    return clustering.fit(distances).labels_.astype(np.int64)


def merge_clusters(masks: Tensor, labels: np.ndarray) -> Tensor:
    """Each cluster's mask is the renormalised (min-max) sum of its members: ``(D, H, W) -> (n, H, W)``."""
    members = F.one_hot(torch.as_tensor(labels, device=masks.device)).T.to(masks.dtype)  # (n, D)
    return minmax((members @ masks.flatten(1)).unflatten(1, masks.shape[1:]))


def informative(masks: Tensor) -> Tensor:
    """Drop constant channels (all zero after min-max: they cover nothing): ``(D, H, W) -> (D', H, W)``."""
    return masks[masks.flatten(1).amax(1) > 0]


def pad_stack(per_image: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack ``n_b`` masks per image into ``(B, n_max, H, W)`` plus a ``(B, n_max)`` validity mask."""
    n_max = max(m.shape[0] for m in per_image)
    out = per_image[0].new_zeros((len(per_image), n_max, *per_image[0].shape[1:]))
    valid = torch.zeros(len(per_image), n_max, dtype=torch.bool, device=out.device)
    for b, masks in enumerate(per_image):
        out[b, : masks.shape[0]] = masks
        valid[b, : masks.shape[0]] = True
    return out, valid


def vitcx_masks(features: Tensor, geom: Geometry, threshold: float) -> tuple[Tensor, Tensor]:
    """ViT-CX's merged masks for a batch: ``(B, T, D)`` -> ``(B, n_max, H, W)`` masks, ``(B, n_max)`` valid."""
    merged = []
    for feats in features:  # clustering is per image (scikit-learn); not a model pass
        masks = informative(channel_masks(feats, geom))
        merged.append(merge_clusters(masks, cluster_labels(cosine_distances(masks), threshold)))
    return pad_stack(merged)


class NoiseBank:
    """Seeded Gaussian noise ``N(0, sigma²)`` in the input space, one draw per (draw number, mask index).

    Noise depends only on ``(seed, draw, index)``, never on the batch it is drawn for, so one image
    explained alone gets the same noise as inside a batch. Drawn on the CPU for device independence.
    """

    def __init__(self, seed: int, sigma: float, shape: tuple[int, ...], like: Tensor) -> None:
        self.seed, self.sigma, self.shape, self.like = seed, sigma, shape, like
        self._generator = torch.Generator()

    def __call__(self, draws: Tensor, indices: Tensor) -> Tensor:
        """``(P,)`` draw numbers and ``(P,)`` mask indices -> ``(P, *shape)`` noise."""
        out = torch.empty((len(indices), *self.shape))
        for row, (draw, index) in enumerate(zip(draws.tolist(), indices.tolist(), strict=True)):
            self._generator.manual_seed(hash((self.seed, draw, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            out[row] = torch.randn(self.shape, generator=self._generator)
        return (out * self.sigma).to(device=self.like.device, dtype=self.like.dtype)


def image_chunks(images: Tensor, size: int) -> list[Tensor]:
    """Chunks of at most ``size`` consecutive pairs that never mix images: ``(P,)`` image index of each pair,
    sorted -> the positions ``(p,)`` of each chunk's pairs (none for ``P = 0``).

    Each image's pairs start a new chunk and fill chunks of ``size`` up to its last one, so an image's chunks,
    and the shapes of the forwards they make, depend on its own pairs only.
    """
    if len(images) == 0:
        return []
    counts = torch.bincount(images)
    first = (counts.cumsum(0) - counts).repeat_interleave(counts)  # (P,) position of its image's first pair
    position = torch.arange(len(images), device=images.device)
    starts = ((position - first) % size == 0).nonzero().flatten()
    return list(position.tensor_split(starts[1:].tolist()))


@dataclass
class MaskScorer:
    """Scores masks of a batch with the ViT-CX causal score, in chunks of masked forwards that never mix images.

    A chunk holds up to ``batch_size // 2`` (masked, noisy) pairs of one image, so each image's scores are the
    same whichever images share the call (float32 matrix products round according to their shape; a rank
    explains only its share of the probes). An image's last chunk is partial: a call of ``B`` images runs at
    most ``B - 1`` more forwards than chunks mixing images would, and no more model evaluations.

    Attributes:
        probs: model -> softmax probabilities, ``(P, C, H, W) -> (P, num_classes)``.
        images: ``(B, C, H, W)``.
        masks: ``(B, n, H, W)``.
        targets: ``(B, K)``.
        clean: ``(B, K)`` target probabilities on the clean images.
        noise: the seeded noise source.
        batch_size: masked images per forward at most (each chunk of pairs costs two forwards' worth).
    """

    probs: Callable[[Tensor], Tensor]
    images: Tensor
    masks: Tensor
    targets: Tensor
    clean: Tensor
    noise: NoiseBank
    batch_size: int

    def __post_init__(self) -> None:
        self.evaluations = torch.ones(self.images.shape[0], device=self.images.device)  # the clean pass

    def __call__(self, select: Tensor, draws: Tensor) -> Tensor:
        """Score the selected masks once.

        Args:
            select: ``(B, n)`` bool, masks to score.
            draws: ``(B, n)`` int64, the draw number of each mask (noise identity).

        Returns:
            ``(B, n, K)`` scores, zero where not selected.
        """
        batch_idx, mask_idx = select.nonzero(as_tuple=True)  # sorted by image, then mask
        scores = self.images.new_zeros((*select.shape, self.targets.shape[1]), dtype=torch.float32)
        for pairs in image_chunks(batch_idx, max(1, self.batch_size // 2)):
            b, i = batch_idx[pairs], mask_idx[pairs]
            mask = self.masks[b, i].unsqueeze(1).to(self.images.dtype)  # (P, 1, H, W)
            eps = self.noise(draws[b, i], i) * (1 - mask)
            x = self.images[b]
            p = self.probs(torch.cat([x * mask + eps, x + eps]))
            t = self.targets[b]
            masked, noisy = p[: len(b)].gather(1, t), p[len(b) :].gather(1, t)
            scores[b, i] = masked - noisy + self.clean[b]
        self.evaluations += 2 * torch.bincount(batch_idx, minlength=select.shape[0]).to(self.evaluations)
        return scores


def coverage_corrected(scores: Tensor, masks: Tensor, counted: Tensor, valid: Tensor) -> Tensor:
    """``Σ_i s_i M_i / Σ_j M_j`` over each image's own masks: ``scores`` ``(B, n, K)``, ``masks`` ``(B, n, H, W)``,
    ``counted`` ``(B, n, K)`` bool (masks in the denominator), ``valid`` ``(B, n)`` bool (each image's masks,
    first in its row, as :func:`pad_stack` leaves them) -> ``(B, K, H, W)``. Scores of masks not to count must
    be zero.

    One product per image over its own masks, not one over the batch's padded ``n``: the padding's length
    depends on the other images of the call, and a float32 product over a longer, zero-padded sum rounds
    differently (by about 1e-7 relative with one target, on a CPU).
    """
    maps = []
    for image_scores, image_masks, image_counted, n in zip(scores, masks, counted, valid.sum(1).tolist(), strict=True):
        numerator = torch.einsum("nk,nhw->khw", image_scores[:n], image_masks[:n])
        coverage = torch.einsum("nk,nhw->khw", image_counted[:n].to(masks.dtype), image_masks[:n])
        maps.append(numerator / coverage.clamp_min(1e-6))
    return torch.stack(maps)
