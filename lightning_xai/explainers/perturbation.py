"""Perturbation explainers built on last-block feature masks: ViT-CX and C2F-Explainer."""

from __future__ import annotations

import inspect
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_xai.adapters import Capture, Geometry, capture
from lightning_xai.explainers.base import Explainer, RawMaps, minmax, upsample
from lightning_xai.explainers.masks import (
    MaskScorer,
    NoiseBank,
    channel_masks,
    cluster_labels,
    cosine_distances,
    coverage_corrected,
    informative,
    merge_clusters,
    pad_stack,
    vitcx_masks,
)
from lightning_xai.explainers.registry import register
from lightning_xai.explainers.relevance import rollout_product
from lightning_xai.validation import resolve_targets

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # .../lightning_xai

GRANULARITIES = ("draws", "clusters")
FUSIONS = ("relation", "contrast")


#: how :class:`NoPositiveMaskWarning`'s message ends (the callbacks, which show it once per run, drop it)
WARNED_ONCE = " Warned once per explainer."


class NoPositiveMaskWarning(UserWarning):
    """C2F's three-way decisions called no mask positive for some image and target, so the coarse map fell
    back to the top-scored mask. Issued once per explainer instance, at the user's call site."""


def _user_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` called from this module's caller chain that points at the first
    frame outside the ``lightning_xai`` package (Python 3.11 has no ``skip_file_prefixes``)."""
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _positive_float(name: str, value: Any, upper: float | None = None) -> float:
    """``value`` as a finite float in ``(0, upper]``; a clear error naming ``name`` otherwise."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value <= 0 or (upper is not None and value > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a finite number > 0{bound}, got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _per_stage(name: str, value: Any) -> tuple[Any, ...]:
    """A non-empty sequence of per-stage values as a tuple (a string or a bare number is not one)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty sequence with one entry per stage, got {value!r}")
    return tuple(value)


def _option_defaults(cls: type) -> dict[str, Any]:
    """Default values of the keyword-only options of ``cls``'s constructors (the subclass's win)."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is Explainer or "__init__" not in vars(klass) or not issubclass(klass, Explainer):
            continue
        for name, parameter in inspect.signature(klass.__init__).parameters.items():
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is not inspect.Parameter.empty:
                defaults[name] = parameter.default
    return {name: defaults[name] for name in cls.option_names() if name in defaults}


class _MaskExplainer(Explainer):
    """Shared set-up of the mask-based explainers: options, the clean pass and the scorer."""

    def __init__(
        self,
        model: nn.Module,
        *,
        cluster_threshold: float = 0.1,
        noise_sigma: float = 0.1,
        batch_size: int = 64,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        options = self.check_options(
            dict(cluster_threshold=cluster_threshold, noise_sigma=noise_sigma, batch_size=batch_size, seed=seed)
        )
        self.cluster_threshold = options["cluster_threshold"]
        self.noise_sigma = options["noise_sigma"]
        self.batch_size = options["batch_size"]
        self.seed = options["seed"]

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Checked options with the defaults filled in: ``cluster_threshold`` in ``(0, 2]`` (a cosine
        distance), ``noise_sigma`` > 0, ``batch_size`` an int >= 1, ``seed`` an int."""
        options = {**_option_defaults(cls), **super().check_options(options)}
        options["cluster_threshold"] = _positive_float("cluster_threshold", options["cluster_threshold"], 2.0)
        options["noise_sigma"] = _positive_float("noise_sigma", options["noise_sigma"])
        options["batch_size"] = _positive_int("batch_size", options["batch_size"])
        if isinstance(options["seed"], bool) or not isinstance(options["seed"], int):
            raise ValueError(f"seed must be an int, got {options['seed']!r}")
        return options

    def _probs(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.handle.probabilities(self.logits(x))

    def _clean_pass(self, x: Tensor, targets: Any, what: tuple[str, ...]) -> tuple[Capture, Tensor, Tensor]:
        """The clean forward recording ``what``, one image at a time: ``x`` ``(B, C, H, W)`` -> the record (each
        list entry ``(B, ...)``), targets ``(B, K)`` and their probabilities ``(B, K)``.

        One forward per image, so that what an image gets does not depend on the other images of the call (a
        rank explains only its share of the probes, :mod:`lightning_xai.callbacks.ranks`): float32 matrix
        products round according to their shape, e.g. on a CPU the head's product for 2 images differs in the
        last bits from the one for 4. The clean pass is one forward per image among the many masked ones.
        """
        logits, records = [], []
        with torch.no_grad(), capture(self.vit, what) as record:
            for image in x.split(1):
                logits.append(self.logits(image))
                records.append({name: list(getattr(record, name)) for name in what})
                record.clear()
        layers = {name: [torch.cat(parts) for parts in zip(*(r[name] for r in records), strict=True)] for name in what}
        scores = torch.cat(logits)
        resolved = resolve_targets(targets, scores)
        return Capture(blocks=record.blocks, **layers), resolved, self.handle.probabilities(scores).gather(1, resolved)

    def mask_scorer(self, x: Tensor, masks: Tensor, resolved: Tensor, probs: Tensor) -> MaskScorer:
        """The causal scorer of ``masks`` ``(B, n, H, W)`` for images ``x`` ``(B, C, H, W)``, targets ``resolved``
        ``(B, K)`` and their clean probabilities ``probs`` ``(B, K)``, with this explainer's seeded noise."""
        noise = NoiseBank(self.seed, self.noise_sigma, tuple(x.shape[1:]), x)
        return MaskScorer(self._probs, x, masks, resolved, probs.float(), noise, self.batch_size)


@register
class ViTCX(_MaskExplainer):
    """ViT-CX (Xie et al., IJCAI 2023) as METHODS.md defines it: last-block ``norm1`` channel masks merged
    by clustering, causal scores with seeded noise, map ``(1/n) Σ s_i M_i / Σ_j M_j``.

    Constant channels (which cover nothing) are dropped before clustering.

    Args:
        cluster_threshold: cosine distance at which complete-linkage clustering stops merging (0.1).
        noise_sigma: standard deviation of the Gaussian noise in the input space (0.1).
        batch_size: masked images per forward pass.
        seed: noise seed.
    """

    name = "vitcx"

    def compute(self, x: Tensor, targets: Any, geom: Geometry) -> RawMaps:
        record, resolved, probs = self._clean_pass(x, targets, ("norm1",))
        masks, valid = vitcx_masks(record.norm1[-1], geom, self.cluster_threshold)
        scorer = self.mask_scorer(x, masks, resolved, probs)
        scores = scorer(valid, torch.zeros(valid.shape, dtype=torch.long, device=valid.device))
        counted = valid.unsqueeze(-1).expand_as(scores)
        maps = coverage_corrected(scores, masks, counted, valid) / valid.sum(1).view(-1, 1, 1, 1)
        return RawMaps(maps, resolved, probs, {"evaluations": scorer.evaluations})


def _check_thresholds(thresholds: Any) -> tuple[tuple[float, float], ...]:
    """``(alpha_k, beta_k)`` pairs with ``0 <= beta_k <= alpha_k <= 1`` as a tuple of float pairs."""
    problem = ValueError(
        f"thresholds must be a non-empty sequence of (alpha, beta) pairs with 0 <= beta <= alpha <= 1, one per "
        f"stage, e.g. ((0.8, 0.2), (0.7, 0.3), (0.5, 0.5)); got {thresholds!r}"
    )
    try:
        pairs = tuple((float(a), float(b)) for a, b in _per_stage("thresholds", thresholds))
    except (TypeError, ValueError):
        raise problem from None
    if any(not 0 <= beta <= alpha <= 1 for alpha, beta in pairs):
        raise problem
    return pairs


@register
class C2FExplainer(_MaskExplainer):
    """C2F-Explainer (Ding et al., IEEE TKDE 36(12), 2024): implements METHODS.md's reading (the paper has no
    reachable code or equations); ``fusion="contrast"`` keeps the specification's first AF reading.

    A coarse map from the masks that sequential three-way decisions (S3WM) call positive, refined by attention
    fusion (AF) over the cross-layer relation matrix ``Π_l rownorm(mean_h A^l + I)``: the fine map is
    ``minmax(S_coarse ⊙ upsample(I))`` with patch importance ``I = minmax(f) ⊙ minmax(relu(cos(Q_i, f) −
    cos(Q_i, b)))`` (``f``, ``b``: the coarse map's foreground and background relation profiles).

    ``maps`` is the fine map; ``coarse`` and ``fine`` are both returned, with ``evaluations`` per image.
    ``raw`` is ``S_coarse ⊙ upsample(I)`` (the fine map before its final min-max) times the peak of the
    unnormalised coarse map ``Σ_{POS} s̄_i M_i / Σ_j M_j``, so its strength follows the masks' scores.

    Args:
        granularity: ``"draws"`` (default: deferred masks get more noise draws) or ``"clusters"`` (granules
            of a dendrogram cut at ``levels``, deferred granules split into their children).
        thresholds: ``(alpha_k, beta_k)`` per stage; the last stage is two-way (``v >= alpha`` positive,
            else negative), so every mask is decided.
        draws: noise draws per stage for ``granularity="draws"`` (one entry per stage).
        levels: coarse-to-fine cosine distances of the dendrogram cuts for ``granularity="clusters"``
            (one entry per stage).
        fusion: ``"relation"`` (default: ``I`` is the foreground relation ``minmax(f)`` times the cosine
            contrast) or ``"contrast"`` (the cosine contrast alone, the earlier reading).
        cluster_threshold, noise_sigma, batch_size, seed: as for ViT-CX.
    """

    name = "c2f"

    def __init__(
        self,
        model: nn.Module,
        *,
        granularity: str = "draws",
        thresholds: Sequence[Sequence[float]] = ((0.8, 0.2), (0.7, 0.3), (0.5, 0.5)),
        draws: Sequence[int] = (1, 1, 2),
        levels: Sequence[float] = (0.5, 0.25, 0.1),
        fusion: str = "relation",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        options = self.check_options(
            dict(granularity=granularity, thresholds=thresholds, draws=draws, levels=levels, fusion=fusion)
        )
        self.granularity = options["granularity"]
        self.thresholds = options["thresholds"]
        self.draws = options["draws"]
        self.levels = options["levels"]
        self.fusion = options["fusion"]
        self._warned = False

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Checked options with the defaults filled in (ViT-CX's as well): ``granularity`` and ``fusion`` among
        their choices; ``thresholds`` pairs ``0 <= beta <= alpha <= 1``; ``draws`` (ints >= 1) or ``levels``
        (decreasing distances in ``(0, 2]``), whichever ``granularity`` uses, with one entry per stage."""
        options = super().check_options(options)
        if options["granularity"] not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {options['granularity']!r}")
        if options["fusion"] not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {options['fusion']!r}")
        options["thresholds"] = _check_thresholds(options["thresholds"])
        options["draws"] = tuple(_positive_int("draws[k]", d) for d in _per_stage("draws", options["draws"]))
        options["levels"] = tuple(
            _positive_float("levels[k]", v, 2.0) for v in _per_stage("levels", options["levels"])
        )
        stages = len(options["thresholds"])
        name = "draws" if options["granularity"] == "draws" else "levels"
        if len(options[name]) != stages:
            raise ValueError(
                f"{name} needs one entry per stage (granularity={options['granularity']!r}): "
                f"{len(options[name])} given for {stages} stages of thresholds"
            )
        levels = options["levels"]
        if name == "levels" and list(levels) != sorted(levels, reverse=True):
            raise ValueError(f"levels must go from coarse to fine (decreasing distances), got {levels}")
        return options

    def compute(self, x: Tensor, targets: Any, geom: Geometry) -> RawMaps:
        record, resolved, probs = self._clean_pass(x, targets, ("attn", "norm1"))
        features = record.norm1[-1]
        if self.granularity == "draws":
            masks, valid = vitcx_masks(features, geom, self.cluster_threshold)
            scorer = self.mask_scorer(x, masks, resolved, probs)
            mean, decision = self._decide_by_draws(scorer, valid, probs)
        else:
            masks, valid, parents = self._granules(features, geom)
            scorer = self.mask_scorer(x, masks, resolved, probs)
            mean, decision = self._decide_by_clusters(scorer, valid, parents, probs)
        coarse_raw = self._coarse(mean, masks, decision, valid)
        coarse = minmax(coarse_raw)
        importance = self._attention_fusion(record.attn, coarse, geom)
        # S_fine = minmax(S_coarse ⊙ upsample(I)) on the normalised coarse map; the raw map keeps the coarse
        # peak so its strength stays comparable across epochs
        fine_raw = coarse * importance * coarse_raw.flatten(2).amax(-1)[..., None, None]
        extras = {"coarse": coarse, "fine": minmax(fine_raw), "evaluations": scorer.evaluations}
        return RawMaps(fine_raw, resolved, probs, extras)

    # -- S3WM ---------------------------------------------------------------------------------------------
    # decision tensors are (B, n, K) int8: 1 positive, -1 negative, 0 undecided / not part of the partition
    def _three_way(self, value: Tensor, stage: int) -> tuple[Tensor, Tensor]:
        """Positive and negative calls of stage ``stage`` for decision values ``v`` in ``[0, 1]``."""
        alpha, beta = self.thresholds[stage]
        positive = value >= alpha
        negative = ~positive if stage == len(self.thresholds) - 1 else value <= beta
        return positive, negative

    def _decide_by_draws(self, scorer: MaskScorer, valid: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Stage ``k`` gives every still-undecided mask ``draws[k]`` more noise draws, then decides it."""
        total = torch.zeros((*valid.shape, probs.shape[1]), device=valid.device)
        count = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
        decision = torch.zeros_like(total, dtype=torch.int8)
        for stage, draws in enumerate(self.draws):
            undecided = (decision == 0) & valid.unsqueeze(-1)
            pending = undecided.any(-1)
            if not pending.any():
                break
            for _ in range(draws):
                total += scorer(pending, count)
                count += pending.long()
            mean = total / count.clamp_min(1).unsqueeze(-1)
            positive, negative = self._three_way(self._value(mean, probs), stage)
            decision[undecided & positive] = 1
            decision[undecided & negative] = -1
        return total / count.clamp_min(1).unsqueeze(-1), decision

    @staticmethod
    def _value(mean: Tensor, probs: Tensor) -> Tensor:
        """Decision value ``v = clip(s̄ / p_c(x), 0, 1)``: ``(B, n, K)``."""
        return (mean / probs.unsqueeze(1).clamp_min(1e-12)).clamp(0, 1)

    def _granules(self, features: Tensor, geom: Geometry) -> tuple[Tensor, Tensor, Tensor]:
        """Granules of every level for each image, stacked: masks ``(B, G, H, W)``, valid ``(B, G)`` and
        ``parents`` ``(B, G)`` (index of the granule one level up, -1 at the top level)."""
        all_masks, all_parents = [], []
        for feats in features:  # per-image clustering (scikit-learn); not a model pass
            masks = informative(channel_masks(feats, geom))
            distances = cosine_distances(masks)
            labels = [cluster_labels(distances, level) for level in self.levels]
            granule_masks, parents, start, previous = [], [], 0, None  # start: first index of the level above
            for level_labels in labels:
                count = int(level_labels.max()) + 1
                granule_masks.append(merge_clusters(masks, level_labels))
                if previous is None:
                    parents.append(np.full(count, -1))
                else:  # complete-linkage cuts of one dendrogram are nested: any member names the parent
                    first_member = np.array([np.flatnonzero(level_labels == g)[0] for g in range(count)])
                    parents.append(start + previous[first_member])
                    start += int(previous.max()) + 1
                previous = level_labels
            all_masks.append(torch.cat(granule_masks))
            all_parents.append(torch.as_tensor(np.concatenate(parents), device=masks.device))
        masks, valid = pad_stack(all_masks)
        parents = torch.full(valid.shape, -2, dtype=torch.long, device=valid.device)
        for b, p in enumerate(all_parents):
            parents[b, : len(p)] = p
        return masks, valid, parents

    def _decide_by_clusters(
        self, scorer: MaskScorer, valid: Tensor, parents: Tensor, probs: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Stage ``k`` scores the live granules of level ``k`` once and decides them; a deferred granule's
        children (level ``k + 1``) are live at the next stage. The decided granules partition the channels."""
        shape = (*valid.shape, probs.shape[1])
        decision = torch.zeros(shape, dtype=torch.int8, device=valid.device)
        mean = torch.zeros(shape, device=valid.device)
        live = ((parents == -1) & valid).unsqueeze(-1).expand(shape)
        has_parent = (parents >= 0).unsqueeze(-1).expand(shape)
        parent_index = parents.clamp_min(0).unsqueeze(-1).expand(shape)
        for stage in range(len(self.levels)):
            scored = live.any(-1)
            if not scored.any():
                break
            mean = torch.where(live, scorer(scored, torch.zeros_like(parents)), mean)
            positive, negative = self._three_way(self._value(mean, probs), stage)
            decision[live & positive] = 1
            decision[live & negative] = -1
            deferred = live & (decision == 0)
            live = has_parent & deferred.gather(1, parent_index)
        return mean, decision

    def _coarse(self, mean: Tensor, masks: Tensor, decision: Tensor, valid: Tensor) -> Tensor:
        """``Σ_{POS} s̄_i M_i / Σ_{decided j} M_j``: ``(B, n, K)`` scores, ``(B, n)`` valid -> ``(B, K, H, W)``."""
        positive, counted = decision == 1, decision != 0
        empty = ~positive.any(1)  # (B, K): no positive mask for this image and target
        if empty.any():
            if not self._warned:
                warnings.warn(
                    "C2F: for some image and target no mask was decided positive, so the coarse map uses the "
                    "top-scored mask alone. If this happens often, lower the positive thresholds alpha_k of "
                    "the option `thresholds` (default ((0.8, 0.2), (0.7, 0.3), (0.5, 0.5)))." + WARNED_ONCE,
                    NoPositiveMaskWarning,
                    stacklevel=_user_stacklevel(),
                )
                self._warned = True
            top = mean.masked_fill(~counted, float("-inf")).argmax(1)  # (B, K)
            fallback = torch.zeros_like(positive).scatter_(1, top.unsqueeze(1), True)
            positive = torch.where(empty.unsqueeze(1), fallback, positive)
        return coverage_corrected(mean * positive, masks, counted, valid)

    # -- AF -----------------------------------------------------------------------------------------------
    def _attention_fusion(self, attn: list[Tensor], coarse: Tensor, geom: Geometry) -> Tensor:
        """Patch importance ``I`` on the patch grid, upsampled: ``(B, K, H, W)`` in ``[0, 1]``.

        ``fusion="relation"``: ``I = minmax(f) ⊙ minmax(relu(cos(Q_i, f) − cos(Q_i, b)))``;
        ``fusion="contrast"``: ``I = minmax(relu(cos(Q_i, f) − cos(Q_i, b)))``. ``Q`` ``(B, N, N)`` is the patch
        block of the cross-layer relation matrix, ``f`` and ``b`` ``(B, K, N)`` the coarse map's foreground and
        background profiles.
        """
        relation = rollout_product([a.float() for a in attn])
        patches = relation[:, geom.num_prefix :, geom.num_prefix :]  # (B, N, N): row i is patch i's profile
        pooled = torch.nn.functional.adaptive_avg_pool2d(coarse.float(), geom.grid).flatten(2)  # (B, K, N)
        fg = (pooled @ patches) / pooled.sum(-1, keepdim=True).clamp_min(1e-12)
        bg = ((1 - pooled) @ patches) / (1 - pooled).sum(-1, keepdim=True).clamp_min(1e-12)
        unit = torch.nn.functional.normalize(patches, dim=-1)
        cos_fg = torch.einsum("bin,bkn->bki", unit, torch.nn.functional.normalize(fg, dim=-1))
        cos_bg = torch.einsum("bin,bkn->bki", unit, torch.nn.functional.normalize(bg, dim=-1))
        importance = minmax((cos_fg - cos_bg).clamp_min(0).unflatten(-1, geom.grid))  # (B, K, h, w)
        if self.fusion == "relation":
            importance = minmax(fg.unflatten(-1, geom.grid)) * importance
        return upsample(importance, geom.image_size)
