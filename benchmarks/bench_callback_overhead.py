"""Cost of the explanation callback: the main example's epoch time with and without it, as a ratio.

    python benchmarks/bench_callback_overhead.py              # example defaults, 4 epochs per run
    python benchmarks/bench_callback_overhead.py --epochs 2   # quicker

Both runs use the example's data, model and seed (``examples/train_vit.py`` defaults: texture family,
3,072 training images, 32 px, the callback at its defaults: GradToken and C2F on 8 validation probes every
epoch). Runs alternate (without, with, without, with, ...) so that machine drift hits both alike; the
figure is the median epoch time, the first epoch of each run excluded (start-up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch

from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.demos import MEAN, SMALL_VIT, STD, SyntheticDataModule, ViTClassifier

EXAMPLE_VIT = dict(model_name="vit_tiny_patch16_224", image_size=32, **SMALL_VIT)


class EpochTimer(pl.Callback):
    """Wall time of each whole epoch: training, validation and every callback hook in between."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # registered last, so this runs after the monitor's validation-end hook of the same epoch
        self.times.append(time.perf_counter() - self._start)


def run(with_callback: bool, epochs: int, num_train: int) -> tuple[list[float], float]:
    pl.seed_everything(0, workers=True)
    data = SyntheticDataModule(family="texture", num_classes=4, image_size=32, num_train=num_train, num_val=256,
                               batch_size=64, seed=0, val_return_mask=True)
    module = ViTClassifier(num_classes=4, lr=2e-3, warmup_epochs=1, **EXAMPLE_VIT)
    timer = EpochTimer()
    callbacks = [ExplanationMonitor(class_names=data.classes, mean=MEAN, std=STD)] if with_callback else []
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=pl.loggers.TensorBoardLogger(
        "/tmp/lightning_xai_overhead", name="with" if with_callback else "without"), callbacks=[*callbacks, timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return timer.times, float(trainer.callback_metrics["val_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs")
    parser.add_argument("--num-train", type=int, default=3072)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    accuracy: dict[bool, float] = {}
    for _ in range(args.repeats):
        for with_callback in (False, True):
            epoch_times, accuracy[with_callback] = run(with_callback, args.epochs, args.num_train)
            times[with_callback].extend(epoch_times[1:])
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n## Callback overhead (CPU, {torch.get_num_threads()} threads, example defaults)\n")
    print("| run | median epoch time (s) | validation accuracy |")
    print("|---|---:|---:|")
    print(f"| without callback | {without:.2f} | {accuracy[False]:.3f} |")
    print(f"| with ExplanationMonitor (GradToken + C2F, 8 probes) | {with_:.2f} | {accuracy[True]:.3f} |")
    print(f"\nOverhead: {100 * (with_ / without - 1):+.1f}% of an epoch (ratio {with_ / without:.3f})")
    for with_callback, label in ((False, "without"), (True, "with")):
        print(f"epoch times {label}: {' '.join(f'{t:.2f}' for t in times[with_callback])}")


if __name__ == "__main__":
    main()
