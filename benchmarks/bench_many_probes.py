"""Cost of many probes: seconds and TensorBoard bytes per probe per explanation event, as the probe count grows.

    python benchmarks/bench_many_probes.py                       # 8 and 64 probes at 64 px, GradToken + C2F
    python benchmarks/bench_many_probes.py --probes 8 16 --events 6

Each configuration is one real ``fit`` of an untrained small ViT (the main example's, at ``--image-size``) with a
``TensorBoardLogger`` and ``ExplanationMonitor(methods=["gradtoken", "c2f"], num_probes=P)``, one training batch
and one explanation event per epoch, ``--events`` epochs (plus the fit-start baseline). Measured per event: the
wall and CPU time of the monitor's event (explaining, rendering, writing; the hook alone, not the training step;
on a shared machine the CPU time is the steadier figure) and the growth of the run's event files. Per-probe
timelines are logged only at the events where their columns change, so the late events write fewer bytes than the
first eight; both the mean over all events and the mean over the events after the eighth are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.demos import MEAN, SMALL_VIT, STD, SyntheticDataModule, ViTClassifier


class EventCost(pl.Callback):
    """Per explanation event: seconds spent in the monitor's event, and bytes its event files grew by."""

    def __init__(self, monitor: ExplanationMonitor, log_dir: Path) -> None:
        self.monitor, self.log_dir = monitor, log_dir
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.bytes: list[int] = []

    def setup(self, trainer, pl_module, stage) -> None:
        pipeline = self.monitor.pipeline
        original = pipeline.run

        def timed(record, runner):
            before, start, cpu = self._size(), time.perf_counter(), time.process_time()
            try:
                return original(record, runner)
            finally:
                self.seconds.append(time.perf_counter() - start)
                self.cpu_seconds.append(time.process_time() - cpu)
                self.bytes.append(self._size() - before)

        pipeline.run = timed

    def _size(self) -> int:
        return sum(path.stat().st_size for path in self.log_dir.rglob("events.out.tfevents.*"))


def measure(probes: int, events: int, image_size: int, root: Path) -> EventCost:
    pl.seed_everything(0, workers=True)
    data = SyntheticDataModule(family="texture", num_classes=4, image_size=image_size, num_train=64,
                               num_val=max(64, probes), batch_size=64, seed=0, val_return_mask=True)
    module = ViTClassifier(num_classes=4, lr=2e-3, model_name="vit_tiny_patch16_224", image_size=image_size,
                           **SMALL_VIT)
    monitor = ExplanationMonitor(methods=["gradtoken", "c2f"], num_probes=probes, explain_at_fit_start=True,
                                 class_names=data.classes, mean=MEAN, std=STD)
    logger = pl.loggers.TensorBoardLogger(str(root), name=f"probes{probes}")
    cost = EventCost(monitor, Path(logger.log_dir))
    trainer = pl.Trainer(max_epochs=events, accelerator="cpu", devices=1, logger=logger, callbacks=[monitor, cost],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    return cost


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, nargs="+", default=[8, 64], help="probe counts to measure")
    parser.add_argument("--events", type=int, default=12, help="explained epochs per run (plus the baseline)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the probe images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"GradToken + C2F, {args.image_size} px, {args.events} epochs + baseline, {args.threads} thread(s)")
    print(f"{'probes':>6}  {'s/event':>8}  {'CPU s/event':>11}  {'CPU s/probe/event':>17}  {'KiB/event':>9}  "
          f"{'KiB/probe/event':>15}  {'KiB/probe/event after 8':>23}")
    with tempfile.TemporaryDirectory() as folder:
        for probes in args.probes:
            cost = measure(probes, args.events, args.image_size, Path(folder))
            seconds, cpu = statistics.median(cost.seconds), statistics.median(cost.cpu_seconds)
            kib = statistics.mean(cost.bytes) / 1024
            late = statistics.mean(cost.bytes[8:]) / 1024 if len(cost.bytes) > 8 else float("nan")
            print(f"{probes:>6}  {seconds:>8.2f}  {cpu:>11.2f}  {cpu / probes:>17.3f}  {kib:>9.0f}  "
                  f"{kib / probes:>15.1f}  {late / probes:>23.1f}", flush=True)


if __name__ == "__main__":
    main()
