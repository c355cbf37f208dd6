"""Where explanation images and numbers go: one small sink per kind of logger, plus the raw-map files.

Every sink writes one :class:`Record` per explanation event at ``record.step``, the step Lightning logs its own
metrics at (see :func:`lightning_xai.callbacks.keys.logging_step`), so the maps and ``val_loss`` share one axis.

- TensorBoard: ``add_image``/``add_scalar`` at ``record.step``; the overlays and the timeline as one small picture
  per probe (``xai/<method>/overlay/<probe>``, ``xai/<method>/timeline/<probe>``, the timeline only at the events
  where its columns change), which its Images and Time Series cards show at full size; each scalar's description
  (:mod:`~lightning_xai.callbacks.descriptions`) with its first value, and once per run a Custom Scalars layout.
- Weights & Biases: ``wandb.Image`` (uint8), a per-event ``wandb.Table``, probe images uploaded once, the scalars'
  descriptions in the run config (``xai_descriptions``), all with
  ``trainer/global_step = record.step`` (the x axis ``WandbLogger`` defines), in the same W&B row as Lightning's
  metrics of that step (see :meth:`WandbSink.write`).
- Any other logger, or none: PNG files under the run's log directory (one folder per method) and a
  ``metrics.csv``; scalars also go to the logger's own ``log_metrics`` at ``record.step``.
- ``save_raw``: the unnormalised maps of each event as ``.pt`` files.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.scalar import metadata as scalar_metadata
from torch.utils.tensorboard import SummaryWriter

from lightning_xai.callbacks import descriptions, keys
from lightning_xai.explainers import Explanation
from lightning_xai.png import encode_png
from lightning_xai.render import save_png


@dataclass
class Record:
    """Everything one explanation event produced, handed to every sink.

    Attributes:
        epoch: ``trainer.current_epoch`` of the event.
        step: the logging step (``trainer.global_step`` for one optimizer; 0 for the fit-start baseline).
        label: the event's name in captions: ``"ep 3"`` or ``"ep 3 · step 120"``.
        stem: its file name stem: ``"epoch_0003"`` or ``"epoch_0003_step_000120"``.
        grids: per method, the pages of the overlay grid: uint8 ``(H, W, 3)`` each, at most
            ``presentation.PAGE_PROBES`` probes a page (W&B and PNG).
        probe_overlays: per method, uint8 ``(P, H, W, 3)``: each probe's row of the grid alone (TensorBoard's).
        timelines: per method, a uint8 timeline image (rows = probes, columns = events).
        probe_timelines: per method, uint8 ``(P, H, W, 3)``: one small timeline per probe (TensorBoard's), only at
            the events where its columns change.
        scalars: flat ``{"xai/<method>/<name>": value}``.
        rows: per-probe table rows: ``(probe id, target, target name, probability, {method: tile}, label name)``
            (label name ``None`` when the probes have no single label).
        probe_tiles: uint8 ``(P, h, w, 3)`` probe images, set only on the first event (uploaded once).
        explanations: per method, the event's :class:`~lightning_xai.explainers.Explanation`.
        images: further uint8 ``(H, W, 3)`` images by full tag, e.g. ``xai/<method>/shortcut_region``.
        alerts: ``(tag, markdown text)`` notes to raise with the logger, e.g. the shortcut alarm under
            ``xai/<method>/shortcut_alarm``.
    """

    epoch: int
    step: int
    label: str
    stem: str
    grids: dict[str, list[np.ndarray]] = field(default_factory=dict)
    probe_overlays: dict[str, np.ndarray] = field(default_factory=dict)
    timelines: dict[str, np.ndarray] = field(default_factory=dict)
    probe_timelines: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    rows: list[tuple[int, int, str, float, dict[str, np.ndarray], str | None]] = field(default_factory=list)
    probe_tiles: np.ndarray | None = None
    explanations: dict[str, Explanation] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    alerts: list[tuple[str, str]] = field(default_factory=list)

    @property
    def event(self) -> tuple[int, int]:
        """``(epoch, step)``."""
        return self.epoch, self.step


class Sink:
    """Base class: receives one :class:`Record` per explanation event.

    Attributes:
        name: the monitor's ``name`` (``None``: none): every tag goes under ``xai/<name>/`` (:meth:`tag`).
    """

    name: str | None = None
    pictures: frozenset[str] = frozenset()
    """The :class:`Record` pictures it reads (see :data:`~lightning_xai.callbacks.presentation.PICTURE_KINDS`): only
    those are drawn for an event."""

    def tag(self, key: str) -> str:
        """``key`` as this monitor logs it (see :func:`.keys.named`)."""
        return keys.named(key, self.name)

    def write(self, record: Record) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far final (called after Lightning has logged the same step's metrics)."""


class TensorBoardSink(Sink):
    """Images per probe, scalars with their descriptions, and the Custom Scalars layout (once per run: per sink,
    which lives for one ``fit``; a resumed run writes it again into its new event file)."""

    pictures = frozenset({"probe_overlays", "probe_timelines"})

    def __init__(self, logger: Any) -> None:
        self.experiment = logger.experiment
        self._described: set[str] = set()
        self._layout_written = False
        if not callable(getattr(self.experiment, "add_image", None)):
            raise TypeError(
                f"{type(logger).__name__}'s writer ({type(self.experiment).__name__}) has no add_image, so it "
                "cannot take the explanation images. Use a writer with image support (torch's or tensorboardX's "
                "SummaryWriter), or add a CSVLogger: other loggers get PNG files under their log directory."
            )

    def _image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log a uint8 ``(H, W, 3)`` image. With torch's ``SummaryWriter`` the PNG is encoded here by
        :func:`lightning_xai.png.encode_png` and written as the same image summary ``add_image`` writes (which
        would first round-trip the array through float32 and encode with PIL at its slow default level); other
        writers get ``add_image``. TensorBoard's writer then spends about 1 ms of CPU per 10 KB of PNG on the
        record's checksum (pure Python, in its writer thread), so smaller files also cost less there."""
        tag = self.tag(tag)
        if not isinstance(self.experiment, SummaryWriter):
            self.experiment.add_image(tag, image, step, dataformats="HWC")
            return
        height, width = image.shape[:2]
        png = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encode_png(image))
        self.experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=png)]), step)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """``add_scalar``; before the first value of each tag, the same value as a tensor summary carrying the tag's
        description. TensorBoard keeps the metadata of a tag's first summary, and its fast loader (the Rust data
        server, its default) reads metadata from tensor summaries only; the plain value written right after, at
        the same step, replaces the tensor's point there and keeps the tag readable as a scalar by
        ``EventAccumulator.Scalars``."""
        text, tag = descriptions.description(tag), self.tag(tag)
        if tag not in self._described and text and isinstance(self.experiment, SummaryWriter):
            meta = scalar_metadata.create_summary_metadata(display_name=tag, description=text)
            tensor = TensorProto(dtype="DT_FLOAT", float_val=[float(value)], tensor_shape=TensorShapeProto())
            summary = Summary(value=[Summary.Value(tag=tag, tensor=tensor, metadata=meta)])
            self.experiment._get_file_writer().add_summary(summary, step)
            self._described.add(tag)
        self.experiment.add_scalar(tag, value, step)

    def _layout(self, tags: Sequence[str]) -> None:
        """The Custom Scalars layout of ``tags`` (unprefixed; written under the monitor's name, see
        :func:`~lightning_xai.callbacks.descriptions.scalar_layout`),
        once per sink."""
        add = getattr(self.experiment, "add_custom_scalars", None)
        if self._layout_written or not callable(add):
            return
        layout = descriptions.scalar_layout(tags, self.name)
        if layout:
            add(layout)
        self._layout_written = True

    def write(self, record: Record) -> None:
        for method, images in record.probe_overlays.items():  # one per probe: a grid of all probes is squeezed
            for index, image in enumerate(images):  # into a strip by Time Series
                self._image(keys.probe_overlay_key(method, index), image, record.step)
        for method, images in record.probe_timelines.items():  # one per probe: the whole-run picture is
            for index, image in enumerate(images):  # too wide for TensorBoard's cards
                self._image(keys.probe_timeline_key(method, index), image, record.step)
        if record.probe_tiles is not None:
            for index, tile in enumerate(record.probe_tiles):
                self._image(keys.probe_key(index), tile, record.step)
        for tag, image in record.images.items():
            self._image(tag, image, record.step)
        self._layout(list(record.scalars))
        for tag, value in record.scalars.items():
            self._scalar(tag, value, record.step)
        for tag, text in record.alerts:
            self.experiment.add_text(self.tag(tag), text, record.step)
        self.experiment.flush()


class WandbSink(Sink):
    """The event as one W&B row: scalars, the overlay grid, the timeline, the probes once, the per-probe table,
    pictures and alerts (staged so that Lightning's metrics of the same step share the row)."""

    pictures = frozenset({"grids", "timelines", "rows"})

    def __init__(self, logger: Any) -> None:
        try:
            import wandb
        except ImportError as err:
            raise TypeError(
                "a WandbLogger is attached but `wandb` cannot be imported, so images cannot be logged: "
                "pip install wandb (it is a dependency of lightning-xai)"
            ) from err

        self.wandb = wandb
        self.experiment = logger.experiment
        self._staged_at: int | None = None
        self._described: set[str] = set()

    def _describe(self, tags: Sequence[str]) -> None:
        """Put the descriptions of ``tags`` not described yet into the run config (``xai_descriptions``)."""
        new = {self.tag(tag): descriptions.description(tag) for tag in tags}
        new = {tag: text for tag, text in new.items() if tag not in self._described}
        new = {tag: text for tag, text in new.items() if text}
        config = getattr(self.experiment, "config", None)
        if not new or config is None:
            return
        self._described.update(new)
        known = dict(config.get(descriptions.CONFIG_KEY) or {}) if hasattr(config, "get") else {}
        config.update({descriptions.CONFIG_KEY: {**known, **new}}, allow_val_change=True)

    def write(self, record: Record) -> None:
        image = self.wandb.Image
        payload: dict[str, Any] = {"epoch": record.epoch, "trainer/global_step": record.step}
        payload.update(record.scalars)
        self._describe(list(record.scalars))
        for method, pages in record.grids.items():
            captions = [f"{method}, {record.label}" + (f", page {i + 1}/{len(pages)}" if len(pages) > 1 else "")
                        for i in range(len(pages))]
            images = [image(page, caption=text) for page, text in zip(pages, captions, strict=True)]
            payload[keys.image_key(method, "overlay")] = images[0] if len(images) == 1 else images
        for method, timeline in record.timelines.items():
            payload[keys.image_key(method, "timeline")] = image(timeline, caption=f"{method} up to {record.label}")
        if record.probe_tiles is not None:
            payload[keys.PROBES] = [image(tile, caption=f"probe {i}") for i, tile in enumerate(record.probe_tiles)]
        for tag, extra in record.images.items():
            payload[tag] = image(extra, caption=f"{tag}, {record.label}")
        for tag, text in record.alerts:
            payload[tag] = text  # the note in the run's history, also where alerts cannot be sent (offline)
            self._alert(self.tag(tag), text)
        if record.rows:
            methods = list(record.rows[0][4])
            columns = ["epoch", "step", "probe", "target", "target_name", "probability", "label", *methods]
            table = self.wandb.Table(columns=columns)
            for probe, target, name, prob, tiles, label in record.rows:
                cells = (image(tiles[m]) for m in methods)
                table.add_data(record.epoch, record.step, probe, target, name, prob, label, *cells)
            payload[keys.TABLE] = table
        payload = {self.tag(key): value for key, value in payload.items()}
        # Staged, not committed: Lightning's own metrics of this validation (logged right after the callback hook,
        # at the same trainer/global_step) complete the same W&B row, so both share one `_step` too.
        step = getattr(self.experiment, "step", None)
        self.experiment.log(payload, commit=step is None)
        self._staged_at = step

    def _alert(self, tag: str, text: str) -> None:
        """``run.alert`` (W&B's e-mail/Slack alert; an offline run records it for ``wandb sync``) where the run has
        one; the note is logged as text in any case (see :meth:`write`)."""
        alert = getattr(self.experiment, "alert", None)
        if not callable(alert):
            return
        try:
            alert(title=tag, text=text, level=self.wandb.AlertLevel.WARN)
        except Exception:  # noqa: BLE001 - an alert that cannot be sent must not cost the run; the text is logged
            pass

    def flush(self) -> None:
        """Commit the staged row if Lightning logged nothing after it (W&B's step counter has not moved)."""
        if self._staged_at is not None and getattr(self.experiment, "step", None) == self._staged_at:
            self.experiment.log({}, commit=True)
        self._staged_at = None


class PngSink(Sink):
    """PNG files under ``root/xai/<method>/`` plus ``root/xai/metrics.csv`` (``root/xai/<name>/...`` for a named
    monitor); scalars also to ``logger``."""

    pictures = frozenset({"grids", "timelines"})

    def __init__(self, root: Path, logger: Any = None, name: str | None = None) -> None:
        self.root = Path(root) / "xai" / (name or "")
        self.logger, self.name = logger, name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"cannot write explanation images under {self.root} ({err}): set the Trainer's default_root_dir "
                "or the logger's save_dir to a writable folder"
            ) from None

    def write(self, record: Record) -> None:
        for method, pages in record.grids.items():
            for number, page in enumerate(pages):  # epoch_0003.png, then epoch_0003_page_2.png, ...
                suffix = f"_page_{number + 1}" if number else ""
                save_png(page, self.root / method / f"{record.stem}{suffix}.png")
        for method, image in record.timelines.items():
            save_png(image, self.root / method / "timeline.png")
        if record.probe_tiles is not None:
            for index, tile in enumerate(record.probe_tiles):
                save_png(tile, self.root / "probes" / f"probe_{index:02d}.png")
        for tag, image in record.images.items():  # xai/<method>/<name> -> <method>/<name>/<stem>.png
            method, name = tag.split("/")[-2:]
            save_png(image, self.root / method / name / f"{record.stem}.png")
        if record.alerts:
            with (self.root / "alerts.md").open("a") as handle:
                handle.writelines(f"## {tag} ({record.label}, step {record.step})\n\n{text}\n\n"
                                  for tag, text in record.alerts)
        self._append_csv(record, record.scalars)
        if self.logger is not None and record.scalars:
            scalars = {self.tag(key): value for key, value in record.scalars.items()}
            self.logger.log_metrics({**scalars, "epoch": record.epoch}, step=record.step)

    def _append_csv(self, record: Record, scalars: Mapping[str, float]) -> None:
        path = self.root / "metrics.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["epoch", "step", "name", "value"])
            writer.writerows([record.epoch, record.step, self.tag(name), value] for name, value in scalars.items())


class RawMapSink(Sink):
    """``save_raw``: each event's unnormalised maps, targets and probabilities as
    ``root/xai/raw/<method>/<stem>.pt`` (``root/xai/<name>/raw/...`` for a named monitor; ``torch.load`` gives
    ``{"raw": (P, K, H, W), "targets": (P, K), "probs": (P, K), "epoch": int, "step": int}``)."""

    def __init__(self, root: Path, name: str | None = None) -> None:
        self.root = Path(root) / "xai" / (name or "") / "raw"

    def write(self, record: Record) -> None:
        for method, result in record.explanations.items():
            path = self.root / method / f"{record.stem}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {key: getattr(result, key).cpu() for key in ("raw", "targets", "probs")}
            torch.save({**tensors, "epoch": record.epoch, "step": record.step}, path)


def write_all(sinks: Sequence[Sink], record: Record | None, on_failure: Callable[[Sink, Exception], None]) -> None:
    """``record`` to every sink (``None``: flush them); a failing sink goes to ``on_failure`` and the others go on."""
    for sink in sinks:
        try:
            sink.write(record) if record is not None else sink.flush()
        except Exception as err:  # noqa: BLE001 - one logger failing must not stop the others
            on_failure(sink, err)


def _kind(logger: Any) -> str:
    names = {cls.__name__ for cls in type(logger).__mro__}
    if "TensorBoardLogger" in names:
        return "tensorboard"
    if "WandbLogger" in names:
        return "wandb"
    return "other"


def _log_root(logger: Any, trainer: pl.Trainer) -> Path:
    for attribute in ("log_dir", "save_dir"):
        value = getattr(logger, attribute, None) if logger is not None else None
        if value:
            return Path(value)
    return Path(trainer.default_root_dir)


def sinks_for(trainer: pl.Trainer, loggers: Sequence[Any], save_raw: bool = False,
              name: str | None = None) -> list[Sink]:
    """One sink per logger in ``loggers``; a PNG sink under the run directory when there are none; with
    ``save_raw`` a :class:`RawMapSink` beside the first PNG sink (or under the trainer's log directory); all
    writing under the monitor's ``name`` (see :func:`.keys.named`)."""
    sinks: list[Sink] = []
    for logger in loggers:
        kind = _kind(logger)
        if kind == "tensorboard":
            sinks.append(TensorBoardSink(logger))
        elif kind == "wandb":
            sinks.append(WandbSink(logger))
        else:
            sinks.append(PngSink(_log_root(logger, trainer), logger, name))
    if not sinks:
        sinks.append(PngSink(_log_root(None, trainer), name=name))
    if save_raw:
        png_roots = [_log_root(sink.logger, trainer) for sink in sinks if isinstance(sink, PngSink)]
        sinks.append(RawMapSink(png_roots[0] if png_roots else Path(trainer.log_dir or trainer.default_root_dir),
                                name))
    for sink in sinks:
        sink.name = name
    return sinks
