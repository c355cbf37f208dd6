"""Cost of the explanation callback: the main example's epoch time with and without it, as a ratio.

    python benchmarks/bench_callback_overhead.py              # example defaults, 4 epochs per run
    python benchmarks/bench_callback_overhead.py --epochs 2   # quicker
    python benchmarks/bench_callback_overhead.py --gradtoken  # also an arm with GradToken alone

Both runs use the example's data, model and seed (``examples/train_vit.py`` defaults: texture family,
3,072 training images, 32 px, the callback at its defaults: GradToken and C2F on 8 validation probes every
epoch). Runs alternate (without, with, without, with, ...) so that machine drift hits both alike; the
figure is the median epoch time, the first epoch of each run excluded (start-up). Each epoch is timed twice:
wall time, and the process's CPU time (``time.process_time``), which other people's jobs on a shared machine
barely move (the runs use one thread, so CPU time is the work done). A third arm runs the callback with
``shortcut_alarm=False``, to show what the shortcut check costs; ``--gradtoken`` adds one with
``methods="gradtoken"`` (its alarm included), to show what C2F costs.
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
    """Wall and CPU time of each whole epoch: training, validation and every callback hook in between."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # registered last, so this runs after the monitor's validation-end hook of the same epoch
        self.times.append(time.perf_counter() - self._start)
        self.cpu.append(time.process_time() - self._cpu)


class TimedMonitor(ExplanationMonitor):
    """The monitor, timing its validation-end hooks (where every explanation event runs and is flushed to the
    loggers) in CPU seconds: the
    hook's share of the same epoch's CPU time, measured in one process, is what other jobs on a shared machine
    cannot blur."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hook_cpu: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        start = time.process_time()
        super().on_validation_epoch_end(trainer, pl_module)
        self.hook_cpu.append(time.process_time() - start)

    def on_validation_end(self, trainer, pl_module) -> None:  # the sinks' flush of the same event
        start = time.process_time()
        super().on_validation_end(trainer, pl_module)
        self.hook_cpu[-1] += time.process_time() - start


ARMS = {"without": None, "with": {}, "with, shortcut_alarm=False": {"shortcut_alarm": False}}
GRADTOKEN_ARM = {"with, methods='gradtoken'": {"methods": "gradtoken"}}


def run(options: dict | None, epochs: int, num_train: int, log_dir: str) -> tuple[EpochTimer, list[float], float]:
    """One fit of the example; ``options``: the monitor's options, ``None`` for no monitor. Returns the epoch
    timer, the monitor's hook CPU seconds per epoch (empty without it) and the validation accuracy."""
    pl.seed_everything(0, workers=True)
    data = SyntheticDataModule(family="texture", num_classes=4, image_size=32, num_train=num_train, num_val=256,
                               batch_size=64, seed=0, val_return_mask=True)
    module = ViTClassifier(num_classes=4, lr=2e-3, warmup_epochs=1, **EXAMPLE_VIT)
    timer = EpochTimer()
    with_callback = options is not None
    callbacks = [TimedMonitor(class_names=data.classes, mean=MEAN, std=STD, **options)] if with_callback else []
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=pl.loggers.TensorBoardLogger(
        log_dir, name="with" if with_callback else "without"), callbacks=[*callbacks, timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    hook = callbacks[0].hook_cpu if callbacks else []
    return timer, hook, float(trainer.callback_metrics["val_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of runs (one run per arm each)")
    parser.add_argument("--log-dir", default="/tmp/lightning_xai_overhead", help="where the runs' logs go")
    parser.add_argument("--num-train", type=int, default=3072)
    parser.add_argument("--gradtoken", action="store_true", help="also run the monitor with GradToken alone")
    args = parser.parse_args()
    arms = {**ARMS, **(GRADTOKEN_ARM if args.gradtoken else {})}
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, list[float]] = {arm: [] for arm in arms}
    share: dict[str, list[float]] = {arm: [] for arm in arms}
    accuracy: dict[str, float] = {}
    for _ in range(args.repeats):
        for arm, options in arms.items():
            timer, hook, accuracy[arm] = run(options, args.epochs, args.num_train, args.log_dir)
            wall[arm].extend(timer.times[1:])
            cpu[arm].extend(timer.cpu[1:])
            # the hook's CPU time over the rest of the same epoch's: the overhead, measured in one process
            if hook:
                share[arm].extend(h / (c - h) for h, c in zip(hook[1:], timer.cpu[1:], strict=True))
    median = {arm: (statistics.median(wall[arm]), statistics.median(cpu[arm])) for arm in arms}
    base_wall, base_cpu = median["without"]
    print(f"\n## Callback overhead (CPU, {torch.get_num_threads()} threads, example defaults)\n")
    print("| run | median epoch wall time (s) | x without | median epoch CPU time (s) | x without | val accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm in arms:
        w, c = median[arm]
        methods = "GradToken" if (arms[arm] or {}).get("methods") == "gradtoken" else "GradToken + C2F"
        label = "without callback" if arm == "without" else f"ExplanationMonitor {arm} ({methods}, 8 probes)"
        print(f"| {label} | {w:.2f} | {w / base_wall:.3f} | {c:.2f} | {c / base_cpu:.3f} | {accuracy[arm]:.3f} |")
    print("\nThe monitor's hook (every explanation event) in CPU time, over the rest of the same epoch's CPU time")
    print("(median over epochs; the overhead measured within one process):")
    for arm in arms:
        if share[arm]:
            print(f"  {arm}: {100 * statistics.median(share[arm]):+.1f}% "
                  f"(epochs: {' '.join(f'{100 * v:.1f}' for v in share[arm])})")
    for arm in arms:
        print(f"epoch wall times {arm}: {' '.join(f'{t:.2f}' for t in wall[arm])}")
        print(f"epoch CPU times {arm}: {' '.join(f'{t:.2f}' for t in cpu[arm])}")

if __name__ == "__main__":
    main()
