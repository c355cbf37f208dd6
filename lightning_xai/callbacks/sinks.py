"""Where explanation images and numbers go: one small sink per kind of logger.

- TensorBoard: ``add_image``/``add_scalar`` with ``global_step = epoch`` (the image slider walks epochs).
- Weights & Biases: ``wandb.Image`` (uint8), a per-epoch ``wandb.Table``, probe images uploaded once.
- Any other logger, or none: PNG files under the run's log directory (one folder per method) and a
  ``metrics.csv``; scalars also go to the logger's own ``log_metrics``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from lightning_xai.render import encode_png, save_png


@dataclass
class EpochRecord:
    """Everything one explanation event produced, handed to every sink.

    Attributes:
        epoch: the epoch explained (``trainer.current_epoch``; the fit-start baseline is logged at epoch 0).
        global_step: the trainer's global step.
        grids: per method, a uint8 ``(H, W, 3)`` grid of probe overlays.
        timelines: per method, a uint8 timeline image (rows = probes, columns = epochs).
        scalars: flat ``{"xai/<method>/<name>": value}``.
        rows: per-probe table rows: ``(probe id, target, target name, probability, {method: tile})``.
        probe_tiles: uint8 ``(P, h, w, 3)`` probe images, set only on the first event (uploaded once).
        baseline: the event is the before-training baseline (``explain_at_fit_start``).
    """

    epoch: int
    global_step: int
    grids: dict[str, np.ndarray]
    timelines: dict[str, np.ndarray]
    scalars: dict[str, float]
    rows: list[tuple[int, int, str, float, dict[str, np.ndarray]]] = field(default_factory=list)
    probe_tiles: np.ndarray | None = None
    baseline: bool = False

    def image_tag(self, method: str, kind: str) -> str:
        """``xai/<method>/<kind>``; the before-training baseline goes to ``xai/<method>/<kind>_init``."""
        return f"xai/{method}/{kind}_init" if self.baseline else f"xai/{method}/{kind}"


class Sink:
    """Base class: receives one :class:`EpochRecord` per explanation event."""

    def write(self, record: EpochRecord) -> None:
        raise NotImplementedError


class TensorBoardSink(Sink):
    def __init__(self, logger: Any) -> None:
        self.experiment = logger.experiment
        if not callable(getattr(self.experiment, "add_image", None)):
            raise TypeError(
                f"{type(logger).__name__}'s writer ({type(self.experiment).__name__}) has no add_image, so it "
                "cannot take the explanation images. Use a writer with image support (torch's or tensorboardX's "
                "SummaryWriter), or add a CSVLogger: other loggers get PNG files under their log directory."
            )

    def _image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log a uint8 ``(H, W, 3)`` image. With torch's ``SummaryWriter`` the PNG is encoded here, at our fast
        compression level, and written as the same image summary ``add_image`` writes (which would first
        round-trip the array through float32 and encode at PIL's slow default); other writers get ``add_image``."""
        if not isinstance(self.experiment, SummaryWriter):
            self.experiment.add_image(tag, image, step, dataformats="HWC")
            return
        height, width = image.shape[:2]
        png = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encode_png(image))
        self.experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=png)]), step)

    def write(self, record: EpochRecord) -> None:
        for method, grid in record.grids.items():
            self._image(record.image_tag(method, "overlay"), grid, record.epoch)
        for method, image in record.timelines.items():
            self._image(f"xai/{method}/timeline", image, record.epoch)
        if record.probe_tiles is not None:
            for index, tile in enumerate(record.probe_tiles):
                self._image(f"xai/probes/{index}", tile, record.epoch)
        for tag, value in record.scalars.items():
            self.experiment.add_scalar(tag, value, record.epoch)
        self.experiment.flush()


class WandbSink(Sink):
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

    def write(self, record: EpochRecord) -> None:
        image = self.wandb.Image
        payload: dict[str, Any] = {"epoch": record.epoch, "trainer/global_step": record.global_step}
        payload.update(record.scalars)
        for method, grid in record.grids.items():
            payload[record.image_tag(method, "overlay")] = image(grid, caption=f"{method}, epoch {record.epoch}")
        for method, timeline in record.timelines.items():
            payload[f"xai/{method}/timeline"] = image(timeline, caption=f"{method} across epochs")
        if record.probe_tiles is not None:
            payload["xai/probes"] = [image(tile, caption=f"probe {i}") for i, tile in enumerate(record.probe_tiles)]
        if record.rows:
            methods = list(record.rows[0][4])
            table = self.wandb.Table(columns=["epoch", "probe", "target", "target_name", "probability", *methods])
            for probe, target, name, prob, tiles in record.rows:
                table.add_data(record.epoch, probe, target, name, prob, *(image(tiles[m]) for m in methods))
            payload["xai/table"] = table
        self.experiment.log(payload)


class PngSink(Sink):
    """PNG files under ``root/xai/<method>/`` plus ``root/xai/metrics.csv``; scalars also to ``logger``."""

    def __init__(self, root: Path, logger: Any = None) -> None:
        self.root = Path(root) / "xai"
        self.logger = logger
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"cannot write explanation images under {self.root} ({err}): set the Trainer's default_root_dir "
                "or the logger's save_dir to a writable folder"
            ) from None

    def write(self, record: EpochRecord) -> None:
        for method, grid in record.grids.items():
            name = "init" if record.baseline else f"epoch_{record.epoch:04d}"
            save_png(grid, self.root / method / f"{name}.png")
        for method, image in record.timelines.items():
            save_png(image, self.root / method / "timeline.png")
        if record.probe_tiles is not None:
            for index, tile in enumerate(record.probe_tiles):
                save_png(tile, self.root / "probes" / f"probe_{index:02d}.png")
        self._append_csv(record.epoch, record.scalars)
        if self.logger is not None and record.scalars:
            self.logger.log_metrics({**record.scalars, "epoch": record.epoch}, step=record.global_step)

    def _append_csv(self, epoch: int, scalars: Mapping[str, float]) -> None:
        path = self.root / "metrics.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["epoch", "name", "value"])
            writer.writerows([epoch, name, value] for name, value in scalars.items())


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


def sinks_for(trainer: pl.Trainer, loggers: Sequence[Any]) -> list[Sink]:
    """One sink per logger in ``loggers``; a PNG sink under the run directory when there are none."""
    sinks: list[Sink] = []
    for logger in loggers:
        kind = _kind(logger)
        if kind == "tensorboard":
            sinks.append(TensorBoardSink(logger))
        elif kind == "wandb":
            sinks.append(WandbSink(logger))
        else:
            sinks.append(PngSink(_log_root(logger, trainer), logger))
    if not sinks:
        sinks.append(PngSink(_log_root(None, trainer)))
    return sinks
