"""What the example scripts share on the command line: ``--help`` formatting and the TensorBoard command they
print."""

from __future__ import annotations

import argparse
from pathlib import Path

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
