"""What an explanation event looks like: probe tiles, captioned overlay grids, per-method timelines and table rows.

:class:`Board` turns one event's :class:`~lightning_xai.explainers.Explanation`\\ s into pictures (uint8 RGB
arrays, rendered by :mod:`lightning_xai.render`) and keeps each method's timeline history, bounded, as small
uint8 maps that also go into checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai import render
from lightning_xai.explainers import Explanation

HISTORY_LIMIT = 48  # timeline frames kept per method; older ones are thinned, first and newest always kept
HISTORY_SIDE = 64  # history maps are stored with their longer side at most this many pixels


@dataclass
class Pictures:
    """One event's pictures.

    Attributes:
        grids: per method, uint8 ``(H, W, 3)``: rows = probes; columns = the probe, then one captioned overlay
            per target (class name and probability).
        timelines: per method, uint8 ``(H, W, 3)``: rows = probes, columns = explanation events so far.
        probe_timelines: per method, uint8 ``(P, H, W, 3)``: one small picture per probe of its maps over the
            events so far (see :func:`lightning_xai.render.probe_timelines`), sized for TensorBoard's cards.
        rows: one table row per probe and target: ``(probe, target, target name, probability, {method: tile})``.
    """

    grids: dict[str, np.ndarray] = field(default_factory=dict)
    timelines: dict[str, np.ndarray] = field(default_factory=dict)
    probe_timelines: dict[str, np.ndarray] = field(default_factory=dict)
    rows: list[tuple[int, int, str, float, dict[str, np.ndarray]]] = field(default_factory=list)


def _history_maps(maps: Tensor) -> np.ndarray:
    """``(P, H, W)`` maps in ``[0, 1]`` -> uint8 ``(P, h, w)`` with ``max(h, w) <= HISTORY_SIDE`` (area-averaged)."""
    maps = torch.nan_to_num(maps.detach().float().cpu(), nan=0.0).clamp(0, 1)
    height, width = maps.shape[-2:]
    scale = HISTORY_SIDE / max(height, width)
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        maps = F.interpolate(maps[:, None], size=size, mode="area")[:, 0]
    return (maps * 255).round().to(torch.uint8).numpy().copy()  # a copy holds no torch tensor alive


class Board:
    """Renders explanation events and keeps the timeline history.

    Args:
        cmap, alpha: colour map and opacity of the overlays.
        mean, std: the input normalisation, to show the probes in true colour (``None``: min-max per image).
        class_names: names shown instead of class indices.
        timeline_columns: most events shown side by side in a timeline.
    """

    def __init__(
        self,
        *,
        cmap: str = "jet",
        alpha: float = 0.5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        timeline_columns: int = 12,
    ) -> None:
        self.cmap, self.alpha, self.mean, self.std = cmap, alpha, mean, std
        self.class_names = list(class_names) if class_names is not None else None
        self.timeline_columns = timeline_columns
        self._history: dict[str, list[tuple[str, np.ndarray]]] = {}
        self._images: Tensor | None = None

    def class_name(self, target: int) -> str:
        if self.class_names is not None and 0 <= target < len(self.class_names):
            return self.class_names[target]
        return str(target)

    # -- pictures ---------------------------------------------------------------------------------------------
    def probe_tiles(self, images: Tensor) -> np.ndarray:
        """uint8 ``(P, h, w, 3)``: the probe images ``(P, C, H, W)`` in (approximately) true colour."""
        images = images.detach().float().cpu()
        blank = torch.zeros(images.shape[0], *images.shape[-2:])
        return render.overlay(images, blank, alpha=0.0, mean=self.mean, std=self.std)

    def overlays(self, images: Tensor, maps: Tensor) -> np.ndarray:
        """uint8 ``(P, K, h, w, 3)``: each probe's map ``(P, K, H, W)`` over its image ``(P, C, H, W)``."""
        count, k = maps.shape[:2]
        repeated = images.detach().float().cpu().repeat_interleave(k, 0)
        tiles = render.overlay(repeated, maps.detach().float().cpu().flatten(0, 1), alpha=self.alpha, cmap=self.cmap,
                               mean=self.mean, std=self.std)
        return tiles.reshape(count, k, *tiles.shape[1:])

    def grid(self, images: Tensor, result: Explanation, tiles: np.ndarray, label: str) -> np.ndarray:
        """Rows = probes; columns = the probe image (captioned with the event ``label``), then one overlay per
        target captioned with the class name and its probability."""
        count, k = result.targets.shape
        texts = [
            f"{self.class_name(int(t))} p={float(p):.2f}"
            for t, p in zip(result.targets.flatten(), result.probs.flatten(), strict=True)
        ]
        captioned = render.caption(tiles.reshape(-1, *tiles.shape[2:]), texts).reshape(count, k, -1, *tiles.shape[3:])
        firsts = render.caption(self.probe_tiles(images), [f"#{i} {label}" for i in range(count)])
        rows = np.concatenate([firsts[:, None], captioned], axis=1)
        return render.grid(rows.reshape(-1, *rows.shape[2:]), ncols=k + 1)

    def add_frame(self, method: str, label: str, maps: Tensor) -> None:
        """Append ``method``'s first-target maps ``(P, H, W)`` as the timeline column ``label``."""
        history = self._history.setdefault(method, [])
        history.append((label, _history_maps(maps)))
        if len(history) > HISTORY_LIMIT:  # thin the middle, keep the first and the newest
            del history[1:-1:2]

    def timeline(self, method: str) -> np.ndarray:
        """uint8 ``(H, W, 3)``: rows = probes, columns = ``method``'s explanation events so far (at most
        ``timeline_columns``, evenly spaced, always the first and the newest)."""
        labels, frames = self._frames(method, self.timeline_columns)
        return render.timeline(list(frames), labels, max_columns=len(labels),
                               row_labels=[f"#{i}" for i in range(frames.shape[1])])

    def probe_timelines(self, method: str) -> np.ndarray:
        """uint8 ``(P, H, W, 3)``: per probe, ``method``'s maps over at most ``render.PROBE_TIMELINE_FRAMES``
        events (evenly spaced, always the first and the newest), in reading order, captioned with the event."""
        labels, frames = self._frames(method, min(self.timeline_columns, render.PROBE_TIMELINE_FRAMES))
        return render.probe_timelines(list(frames), [label.replace(" · ", "\n") for label in labels])

    def _frames(self, method: str, most: int) -> tuple[list[str], np.ndarray]:
        """Labels and overlays ``(C, P, h, w, 3)`` of at most ``most`` events of ``method``'s history."""
        history = self._history.get(method)
        if not history or self._images is None:
            raise KeyError(f"no explanations of {method!r} yet; explained so far: {sorted(self._history)}")
        chosen = render.timeline_columns(len(history), most)
        maps = torch.from_numpy(np.stack([history[i][1] for i in chosen])).float() / 255  # (C, P, h, w)
        frames = self.overlays(self._images, maps.transpose(0, 1)).transpose(1, 0, 2, 3, 4)  # (C, P, h, w, 3)
        return [history[i][0] for i in chosen], frames

    def rows(self, targets: Tensor, probs: Tensor, tiles: dict[str, np.ndarray]):
        """Table rows, one per probe and target: ``(probe, target, name, probability, {method: tile})``."""
        targets, probs = targets.cpu(), probs.cpu()
        return [
            (p, int(targets[p, k]), self.class_name(int(targets[p, k])), float(probs[p, k]),
             {method: t[p, k] for method, t in tiles.items()})
            for p in range(targets.shape[0])
            for k in range(targets.shape[1])
        ]

    def draw(self, images: Tensor, label: str, targets: Tensor, probs: Tensor,
             results: dict[str, Explanation]) -> Pictures:
        """All pictures of one event: ``images`` ``(P, C, H, W)``, ``targets``/``probs`` ``(P, K)``."""
        self._images = images.detach().float().cpu()
        tiles = {name: self.overlays(images, result.maps) for name, result in results.items()}
        pictures = Pictures(rows=self.rows(targets, probs, tiles))
        for name, result in results.items():
            pictures.grids[name] = self.grid(images, result, tiles[name], label)
            self.add_frame(name, label, result.maps[:, 0])
            pictures.timelines[name] = self.timeline(name)
            pictures.probe_timelines[name] = self.probe_timelines(name)
        return pictures

    # -- state ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._history.clear()

    def state_dict(self) -> dict[str, Any]:
        """The timeline history: per method, the column labels and uint8 maps ``(P, h, w)`` (tensors, so that
        checkpoints load with ``weights_only=True``)."""
        history = {m: [(label, torch.from_numpy(maps)) for label, maps in h] for m, h in self._history.items()}
        return {"history": history}

    def load_state_dict(self, state: dict[str, Any], methods: Sequence[str] | None = None) -> None:
        """Restore the history; with ``methods``, only theirs."""
        self._history = {
            m: [(str(label), torch.as_tensor(maps).numpy().copy()) for label, maps in h]
            for m, h in state.get("history", {}).items()
            if methods is None or m in methods
        }


def class_labels(*modules: Any) -> list[str] | None:
    """Class names a model carries itself: the first Hugging Face ``config.id2label`` among ``modules`` (and their
    submodules) that is not the default ``LABEL_<i>``, as a list in class index order; ``None`` if there is none."""
    for module in modules:
        for sub in module.modules():
            labels = getattr(getattr(sub, "config", None), "id2label", None)
            if not isinstance(labels, Mapping) or not labels:
                continue
            try:
                ordered = [str(labels[i]) if i in labels else str(labels[str(i)]) for i in range(len(labels))]
            except KeyError:
                continue
            if ordered != [f"LABEL_{i}" for i in range(len(ordered))]:
                return ordered
    return None
