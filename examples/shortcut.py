"""The shortcut alarm: train one model on clean images and one on images carrying a spurious cue, and watch the
callback raise the alarm on the second only.

The cue is a small mark in the top-left corner whose colour gives the class away, on 90 % of the training *and*
validation images (one biased source), as a watermark or a hospital tag would. Validation accuracy looks
excellent on both runs; only the cue-free test split, and the shortcut check, show that the second model reads
the mark. At each validation the callback pastes the small region each probe's map points at into the probes of
the other classes and counts how often the prediction follows (``xai/gradtoken/shortcut_rate``, drawn with its
threshold ``xai/gradtoken/shortcut_threshold``); the strongest such pair is ``xai/gradtoken/shortcut_evidence``.
Offline, on CPU:

    python examples/shortcut.py              # both runs, about 12 minutes on a busy 2-core CPU
    python examples/shortcut.py --epochs 4   # quicker (about two thirds of that): the cue run still fires at epoch 1,
                                             # the clean run still learns (0.92) and stays silent

Fewer images (``--num-train 1024``) also fire on the cue run only, but leave the clean model near chance at the end
(0.29): the tiny ViT needs about 500 steps of 16 images to learn the textures from scratch.

Prints absolute paths: the TensorBoard log folder (and the command to open it from any folder) and the cue run's
GradToken timeline (rows = probes, columns = epochs: the maps drift onto the mark; the README shows
``docs/shortcut_timeline.png``).
"""

from __future__ import annotations

import argparse
import shlex
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.demos import MEAN, SMALL_VIT, STD, SyntheticDataModule, ViTClassifier
from lightning_xai.demos.cli import HelpFormatter, tensorboard_command
from lightning_xai.render import save_png

#: Batch size and learning rate: small batches, so that the clean run gets enough optimizer steps to learn the
#: textures also in the quick mode (``--epochs 4``: 512 steps, 0.92; with 64 per batch it ended at chance, 0.25).
BATCH_SIZE, LEARNING_RATE = 16, 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per run")
    parser.add_argument("--num-train", type=int, default=2048, help="training images per run")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument("--out", default="runs/shortcut", help="TensorBoard log directory")
    parser.add_argument("--timeline", default=None,
                        help="where to save the cue run's GradToken timeline (default: OUT/cue_timeline.png)")
    parser.add_argument("--stop", action="store_true", help="stop the cue run when the alarm fires")
    return parser.parse_args(argv)


def run(kind: str, args: argparse.Namespace) -> tuple[ExplanationMonitor, SyntheticDataModule, ViTClassifier, list]:
    """Train on ``kind`` data ("clean" or "cue") with the monitor; return it, the data, the model and the alarms."""
    pl.seed_everything(args.seed, workers=True)
    data = SyntheticDataModule(family="texture", num_classes=4, image_size=32, num_train=args.num_train,
                               num_val=256, num_test=256, batch_size=BATCH_SIZE, seed=args.seed,
                               cue_probability=0.9 if kind == "cue" else 0.0)
    model = ViTClassifier(num_classes=4, lr=LEARNING_RATE, warmup_epochs=1, model_name="vit_tiny_patch16_224",
                          image_size=32, **SMALL_VIT)
    monitor = ExplanationMonitor(methods="gradtoken", num_probes=8, mean=MEAN, std=STD, class_names=data.classes,
                                 stop_on_shortcut=args.stop and kind == "cue")
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[monitor],
                         logger=TensorBoardLogger(Path(args.out).resolve(), name=kind), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        trainer.fit(model, datamodule=data)
    alarms = [w for w in caught if "shortcut alarm" in str(w.message)]
    return monitor, data, model.eval(), alarms


def accuracy(model: ViTClassifier, dataset) -> float:
    images, labels, _ = dataset.batch(range(len(dataset)))
    with torch.no_grad():
        return float((model(images).argmax(-1) == labels).float().mean())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out).resolve()
    for kind in ("clean", "cue"):
        monitor, data, model, alarms = run(kind, args)
        rate = monitor.last_scalars.get("xai/gradtoken/shortcut_rate", float("nan"))
        print(f"\n{kind} run: validation accuracy {accuracy(model, data.val_set):.2f}, cue-free test accuracy "
              f"{accuracy(model, data.test_set):.2f}; shortcut rate at the last epoch {rate:.2f} (threshold "
              f"{monitor.records.shortcut.threshold:.2f})")
        print(f"  alarm: {alarms[0].message}" if alarms else "  no alarm")
        if kind == "cue":
            timeline = Path(args.timeline) if args.timeline else Path(args.out) / "cue_timeline.png"
            path = save_png(monitor.timeline("gradtoken"), timeline.resolve())
            print(f"  the cue run's GradToken timeline: {path}")
    print(f"\nTensorBoard logs: {out}\n{tensorboard_command(shlex.quote(str(out)))}\n  (SCALARS: "
          "xai/gradtoken/shortcut_rate and shortcut_threshold; IMAGES: xai/gradtoken/shortcut_evidence and "
          "shortcut_region; TEXT: the alarm)")


if __name__ == "__main__":
    main()
