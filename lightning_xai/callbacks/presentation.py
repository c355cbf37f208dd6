"""What an explanation event looks like: probe tiles, captioned overlay grids, per-method timelines and table rows.

:class:`Board` turns one event's :class:`~lightning_xai.explainers.Explanation`\\ s into pictures (uint8 RGB
arrays, rendered by :mod:`lightning_xai.render`) and keeps each method's timeline history, bounded, as small
uint8 maps that also go into checkpoints.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
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
PAGE_PROBES = 16  # probes per page of an overlay grid (W&B, PNG): 64 probes made one grid 9,922 px tall
#: the kinds of :class:`Pictures` (its fields); :meth:`Board.draw` draws those its caller's sinks read
PICTURE_KINDS = frozenset({"grids", "probe_overlays", "timelines", "probe_timelines", "rows"})


@dataclass
class Pictures:
    """One event's pictures.

    Attributes:
        grids: per method, the pages of the overlay grid, uint8 ``(H, W, 3)`` each, at most :data:`PAGE_PROBES`
            probes a page: rows = probes; columns = the probe (captioned with the event and, when the probes
            have labels, the true and the predicted class), then one captioned overlay per target (class name and
            probability). A wrongly predicted probe's row is framed in red.
        probe_overlays: per method, uint8 ``(P, H, W, 3)``: each probe's row of the grid as a picture of its own.
        timelines: per method, uint8 ``(H, W, 3)``: rows = probes, columns = explanation events so far.
        probe_timelines: per method, uint8 ``(P, H, W, 3)``: one small picture per probe of its maps over the
            events so far (see :meth:`Board.probe_timelines`), sized for TensorBoard's cards; only for the methods
            whose picture changed since the last event.
        rows: one table row per probe and target: ``(probe, target, target name, probability, {method: tile},
            label name or None)``.
    """

    grids: dict[str, list[np.ndarray]] = field(default_factory=dict)
    probe_overlays: dict[str, np.ndarray] = field(default_factory=dict)
    timelines: dict[str, np.ndarray] = field(default_factory=dict)
    probe_timelines: dict[str, np.ndarray] = field(default_factory=dict)
    rows: list[tuple[int, int, str, float, dict[str, np.ndarray], str | None]] = field(default_factory=list)


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
        self._shown: dict[str, list[str]] = {}  # per method, the columns of the probe timelines drawn last

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

    def probe_rows(self, images: Tensor, result: Explanation, tiles: np.ndarray, label: str,
                   labels: Tensor | None = None, predictions: Tensor | None = None) -> np.ndarray:
        """uint8 ``(P, K + 1, h, w, 3)``: per probe, the probe image captioned with ``#<i> <label>`` (and, with
        ``labels``/``predictions`` ``(P,)`` class indices, ``true <name>``, plus ``pred <name>`` when the prediction
        is neither the label nor the first overlay's class, which its caption already names), then its ``K``
        overlays ``tiles`` ``(P, K, h, w, 3)`` captioned with the class name and probability; every tile of a
        probe whose prediction is not its label gets a red frame (:func:`lightning_xai.render.mark`) and a red
        caption band."""
        count, k = result.targets.shape
        texts = [
            f"{self.class_name(int(t))} p={float(p):.2f}"
            for t, p in zip(result.targets.flatten(), result.probs.flatten(), strict=True)
        ]
        known = labels is not None and predictions is not None
        lines = render.CAPTION_LINES + (1 if known else 0)  # a class name such as "vertical_stripes" needs a line
        firsts = [f"#{i} {label}" for i in range(count)]
        if known:
            shown = result.targets[:, 0].cpu().tolist()
            firsts = [f"{first}\ntrue {self.class_name(truth)}"
                      + (f"\npred {self.class_name(guess)}" if guess not in (truth, target) else "")
                      for first, truth, guess, target in zip(firsts, labels.tolist(), predictions.tolist(), shown,
                                                             strict=True)]
        wrong = (labels != predictions).numpy() if known else np.zeros(count, bool)
        images = render.mark(self.probe_tiles(images), wrong)  # frames around the pictures, red captions above
        tiles = render.mark(tiles, wrong)
        bands = [render.WRONG_BAND if flag else None for flag in wrong]
        captioned = render.caption(tiles.reshape(-1, *tiles.shape[2:]), texts, lines,
                                   [band for band in bands for _ in range(k)])
        captioned = captioned.reshape(count, k, *captioned.shape[1:])
        firsts = render.caption(images, firsts, lines, bands)
        return np.concatenate([firsts[:, None], captioned], axis=1)

    def grid_pages(self, rows: np.ndarray) -> list[np.ndarray]:
        """The overlay grid of ``rows`` ``(P, K + 1, h, w, 3)`` (from :meth:`probe_rows`), at most
        :data:`PAGE_PROBES` probes a page: a list of uint8 ``(H, W, 3)``."""
        return [render.grid(rows[start:start + PAGE_PROBES].reshape(-1, *rows.shape[2:]), ncols=rows.shape[1])
                for start in range(0, len(rows), PAGE_PROBES)]

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

    def probe_timeline_columns(self, method: str) -> list[str]:
        """The events (labels) :meth:`probe_timelines` shows: every ``s``-th of ``method``'s history from the
        first, at most ``render.PROBE_TIMELINE_FRAMES`` (:func:`lightning_xai.render.stride_columns`), so the
        pictures change, and are logged again, only now and then."""
        history = self._history.get(method, [])
        if not history:
            return []
        most = min(self.timeline_columns, render.PROBE_TIMELINE_FRAMES)
        return [history[i][0] for i in render.stride_columns(len(history), most)]

    def probe_timelines(self, method: str) -> np.ndarray:
        """uint8 ``(P, H, W, 3)``: per probe, ``method``'s maps at the events of :meth:`probe_timeline_columns`,
        in reading order, captioned with the event (epoch and step on two lines when validation runs within
        epochs)."""
        history = self._history.get(method, [])
        most = min(self.timeline_columns, render.PROBE_TIMELINE_FRAMES)
        labels, frames = self._frames(method, most, render.stride_columns(max(1, len(history)), most))
        return render.probe_timelines(list(frames), [label.replace(" · ", "\n") for label in labels])

    def _frames(self, method: str, most: int, chosen: list[int] | None = None) -> tuple[list[str], np.ndarray]:
        """Labels and overlays ``(C, P, h, w, 3)`` of at most ``most`` events of ``method``'s history (``chosen``
        indices, or evenly spaced ones with the first and the newest)."""
        history = self._history.get(method)
        if not history or self._images is None:
            raise KeyError(f"no explanations of {method!r} yet; explained so far: {sorted(self._history)}")
        chosen = render.timeline_columns(len(history), most) if chosen is None else chosen
        maps = torch.from_numpy(np.stack([history[i][1] for i in chosen])).float() / 255  # (C, P, h, w)
        frames = self.overlays(self._images, maps.transpose(0, 1)).transpose(1, 0, 2, 3, 4)  # (C, P, h, w, 3)
        return [history[i][0] for i in chosen], frames

    def rows(self, targets: Tensor, probs: Tensor, tiles: dict[str, np.ndarray], labels: Tensor | None = None):
        """Table rows, one per probe and target: ``(probe, target, name, probability, {method: tile}, label name)``
        (label name ``None`` without ``labels`` ``(P,)``)."""
        targets, probs = targets.cpu(), probs.cpu()
        names = [None] * targets.shape[0] if labels is None else [self.class_name(int(c)) for c in labels.tolist()]
        return [
            (p, int(targets[p, k]), self.class_name(int(targets[p, k])), float(probs[p, k]),
             {method: t[p, k] for method, t in tiles.items()}, names[p])
            for p in range(targets.shape[0])
            for k in range(targets.shape[1])
        ]

    def draw(self, images: Tensor, label: str, targets: Tensor, probs: Tensor, results: dict[str, Explanation],
             labels: Tensor | None = None, predictions: Tensor | None = None,
             kinds: Collection[str] = PICTURE_KINDS) -> Pictures:
        """The pictures of one event: ``images`` ``(P, C, H, W)``, ``targets``/``probs`` ``(P, K)``; ``labels`` and
        ``predictions`` ``(P,)`` class indices when each probe has one label (shown, and wrong rows marked).

        ``kinds``: which :data:`PICTURE_KINDS` to draw (the others stay empty): those the sinks read, since
        TensorBoard's pictures and W&B's differ and drawing costs time in the training loop. The event joins the
        history (:meth:`timeline`) in any case."""
        kinds = frozenset(kinds)
        unknown = kinds - PICTURE_KINDS
        if unknown:
            raise ValueError(f"unknown picture kinds {sorted(unknown)}; the kinds are {sorted(PICTURE_KINDS)}")
        self._images = images.detach().float().cpu()
        if labels is not None and predictions is not None:
            labels, predictions = labels.cpu().long(), predictions.cpu().long()
        else:
            labels = predictions = None
        overlaid = kinds & {"grids", "probe_overlays", "rows"}
        tiles = {name: self.overlays(images, result.maps) for name, result in results.items()} if overlaid else {}
        pictures = Pictures(rows=self.rows(targets, probs, tiles, labels) if "rows" in kinds else [])
        for name, result in results.items():
            if kinds & {"grids", "probe_overlays"}:
                rows = self.probe_rows(images, result, tiles[name], label, labels, predictions)
                if "grids" in kinds:
                    pictures.grids[name] = self.grid_pages(rows)
                if "probe_overlays" in kinds:
                    pictures.probe_overlays[name] = render.grids(rows, ncols=rows.shape[1])
            self.add_frame(name, label, result.maps[:, 0])
            if "timelines" in kinds:
                pictures.timelines[name] = self.timeline(name)
            columns = self.probe_timeline_columns(name)
            if "probe_timelines" in kinds and columns != self._shown.get(name):  # re-logging an unchanged
                pictures.probe_timelines[name] = self.probe_timelines(name)  # picture costs bytes and time
                self._shown[name] = columns
        return pictures

    # -- state ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._history.clear()
        self._shown.clear()

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
