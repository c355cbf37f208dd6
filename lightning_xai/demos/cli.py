"""What the example scripts share on the command line: ``--help`` formatting, the TensorBoard command they print,
their training options and thread count, and how they print the paths they wrote."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

#: TensorBoard keeps 10 images per tag unless told otherwise, and in TensorBoard 2.21 ``images=0`` (documented as
#: "keep all") makes the images endpoint answer ``[]``: the Images tab stays empty. A large count keeps every
#: explained step (it is a cap, not a reservation: the server's memory does not grow with it).
TENSORBOARD_SAMPLES = "images=10000"


def tensorboard_command(logdir: str | Path) -> str:
    """The command that shows every explained step of the runs under ``logdir`` (the README's, with its folder)."""
    return f"tensorboard --logdir {logdir} --samples_per_plugin {TENSORBOARD_SAMPLES}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None`` (the help text says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


#: Training settings of the examples that train (the main example's, which learn: validation accuracy about 0.97
#: after 10 epochs of the small ViT on 3,072 texture images); ``add_training_arguments`` turns them into options.
TRAINING_DEFAULTS: dict[str, object] = {
    "epochs": 10, "image_size": 32, "family": "texture", "num_classes": 4, "num_train": 3072, "num_val": 256,
    "batch_size": 64, "lr": 2e-3,
}

#: Threads the examples train with unless told otherwise: the small ViT gains little from more, a busy or shared
#: machine loses a lot (see README, "Set up and go"), and a fixed count gives the same numbers on every machine.
DEFAULT_THREADS = 1


def add_training_arguments(parser: argparse.ArgumentParser, **overrides: object) -> None:
    """Add the shared training options (``--epochs``, ``--image-size``, ``--family``, ``--num-classes``,
    ``--num-train``, ``--num-val``, ``--batch-size``, ``--lr``, ``--threads``) with :data:`TRAINING_DEFAULTS`,
    updated by ``overrides``."""
    defaults = {**TRAINING_DEFAULTS, **overrides}
    parser.add_argument("--epochs", type=int, default=defaults["epochs"], help="training epochs")
    parser.add_argument("--image-size", type=int, default=defaults["image_size"], help="side of the generated images")
    parser.add_argument("--family", choices=["shape", "texture"], default=defaults["family"],
                        help="class family of the data (a small ViT from scratch learns textures in minutes)")
    parser.add_argument("--num-classes", type=int, default=defaults["num_classes"],
                        help="number of classes of the family used (2-6)")
    parser.add_argument("--num-train", type=int, default=defaults["num_train"], help="generated training images")
    parser.add_argument("--num-val", type=int, default=defaults["num_val"], help="generated validation images")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="images per training step")
    parser.add_argument("--lr", type=float, default=defaults["lr"], help="AdamW learning rate")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="CPU threads of torch (a fixed count also makes the results the same on every machine; "
                             "0: torch's default, one per core)")


def use_threads(count: int) -> None:
    """Run torch on ``count`` CPU threads (``0``: leave torch's default)."""
    if count < 0:
        raise SystemExit(f"error: --threads must be 0 or more, got {count}")
    if count:
        torch.set_num_threads(count)


def print_path(label: str, path: str | Path) -> Path:
    """Print ``<label>: <absolute path>`` (what the examples wrote, usable from any folder); returns the path."""
    path = Path(path).resolve()
    print(f"{label}: {path}")
    return path
