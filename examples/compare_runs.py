"""Train two small ViTs that differ in one thing and compare how their explanations evolve, side by side.

Run A and run B share the seed, the data and the probe images (the monitor draws its probes from the validation
set with its own seed), so the only difference is the one chosen with ``--vary``:

    python examples/compare_runs.py                              # augment: without vs with random flips/shifts
    python examples/compare_runs.py --vary model-size            # embed_dim 64/depth 4 vs embed_dim 96/depth 6
    python examples/compare_runs.py --logger wandb --epochs 10   # W&B (offline unless you are logged in)

At its defaults (the main example's training settings) both runs learn, in about 3 CPU-minutes for both; ``--epochs
4`` is quicker. At the end it prints the last explanation scores and validation accuracy of both runs and writes the two
final GradToken timelines, A above B, to ``<output-dir>/compare_gradtoken.png``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.demos import MEAN, SMALL_VIT, STD, SyntheticDataModule, ViTClassifier
from lightning_xai.demos.cli import HelpFormatter, add_training_arguments, print_path, tensorboard_command, use_threads
from lightning_xai.explainers import available_methods
from lightning_xai.render import caption, save_png

#: What each ``--vary`` choice changes: run label -> (description, data settings, model settings).
VARIANTS: dict[str, dict[str, tuple[str, dict[str, Any], dict[str, Any]]]] = {
    "augment": {
        "A": ("augment off", {"augment": False}, {}),
        "B": ("augment on", {"augment": True}, {}),
    },
    "model-size": {
        "A": ("embed_dim 64, depth 4", {}, {"embed_dim": 64, "depth": 4}),
        "B": ("embed_dim 96, depth 6", {}, {"embed_dim": 96, "depth": 6}),
    },
}

#: Scalars of the monitor shown in the final table (keys ``xai/<method>/<name>`` ending with these).
SCORES = ("iou", "energy_pointing_game", "entropy")


def build_parser() -> argparse.ArgumentParser:
    """The command line of this example (``--help`` shows every option with its default)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--vary", choices=sorted(VARIANTS), default="augment",
                        help="what differs between run A and run B")
    add_training_arguments(parser)  # the main example's settings, which learn
    parser.add_argument("--methods", nargs="+", default=["gradtoken", "c2f"], choices=available_methods(),
                        help="explanation methods to log")
    parser.add_argument("--num-probes", type=int, default=8, help="validation images explained every epoch")
    parser.add_argument("--logger", choices=["tensorboard", "wandb"], default="tensorboard",
                        help="where the explanations go")
    parser.add_argument("--output-dir", default="runs/compare", help="where logs and the comparison picture go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the probe draw")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.num_probes < 1:
        parser.error("--epochs and --num-probes must be at least 1")
    return args


def build_model(args: argparse.Namespace, overrides: dict[str, Any], class_names: list[str]) -> ViTClassifier:
    """The small from-scratch ViT of ``train_vit.py``, with ``overrides`` of its layout."""
    return ViTClassifier(model_name="vit_tiny_patch16_224", num_classes=args.num_classes, image_size=args.image_size,
                         lr=args.lr, warmup_epochs=1, pretrained=False, class_names=class_names,
                         **{**SMALL_VIT, **overrides})


def staging_dir() -> Path:
    """Where W&B stages the files of the per-epoch ``xai/table`` (its image cells) until ``wandb sync`` uploads
    them: ``$WANDB_DATA_DIR/artifacts/staging``. The run folder's ``.wandb`` file refers to them by absolute path,
    so an offline run's sync needs them; the examples point ``WANDB_DATA_DIR`` at ``<output-dir>/wandb-data``."""
    from wandb import env

    return Path(env.get_data_dir()).expanduser().resolve() / "artifacts" / "staging"


def build_logger(args: argparse.Namespace, name: str):
    root = Path(args.output_dir)
    if args.logger == "wandb":
        if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").exists():
            os.environ.setdefault("WANDB_MODE", "offline")
        if os.environ.get("WANDB_MODE") == "offline":  # see staging_dir()
            os.environ.setdefault("WANDB_DATA_DIR", str((root / "wandb-data").resolve()))
        return WandbLogger(project="lightning-xai", group=f"compare-{args.vary}", name=name, save_dir=str(root))
    run_dir = root / name
    if run_dir.exists():  # a re-run replaces its own run folder, so TensorBoard does not mix two trainings
        print_path("Replacing the previous run in", run_dir)
        shutil.rmtree(run_dir)
    return TensorBoardLogger(str(root), name="", version=name)  # <output-dir>/<name>: one run folder each


def train(args: argparse.Namespace, run: str) -> dict[str, Any]:
    """Train run ``run`` ("A" or "B"); returns what the comparison needs."""
    description, data_settings, model_settings = VARIANTS[args.vary][run]
    name = f"{args.vary}-{run}"
    print(f"\n=== run {run} ({name}): {description} ===")
    pl.seed_everything(args.seed, workers=True)  # same initial weights and data order for both runs
    data = SyntheticDataModule(family=args.family, num_classes=args.num_classes, image_size=args.image_size,
                               num_train=args.num_train, num_val=args.num_val, batch_size=args.batch_size,
                               seed=args.seed, val_return_mask=True, **{"augment": False, **data_settings})
    model = build_model(args, model_settings, list(data.classes))
    monitor = ExplanationMonitor(
        methods=args.methods, num_probes=args.num_probes, seed=args.seed, explain_at_fit_start=True,
        class_names=data.classes, mean=MEAN, std=STD,
    )
    logger = build_logger(args, name)
    logger.log_hyperparams({"vary": args.vary, "run": run, "variant": description, **data_settings})
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, logger=logger, callbacks=[monitor],
                         default_root_dir=args.output_dir, log_every_n_steps=10, enable_checkpointing=True)
    trainer.fit(model, datamodule=data)
    result = {
        "run": run, "name": name, "description": description,
        "val_acc": float(trainer.callback_metrics.get("val_acc", float("nan"))),
        "scalars": dict(monitor.last_scalars),
        "timelines": {method: monitor.timeline(method) for method in args.methods},
        "log_dir": Path(trainer.log_dir or args.output_dir),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if args.logger == "wandb":
        result["log_dir"] = Path(logger.experiment.dir).parent
        logger.experiment.finish()  # close this W&B run before the next one starts
    return result


def print_table(runs: list[dict[str, Any]]) -> None:
    keys = sorted({key for run in runs for key in run["scalars"] if key.rsplit("/", 1)[-1] in SCORES})
    rows = [("val_acc", [run["val_acc"] for run in runs])]
    rows += [(key, [run["scalars"].get(key, float("nan")) for run in runs]) for key in keys]
    width = max(len(label) for label, _ in rows)
    names = [run["name"] for run in runs]
    columns = max(10, *(len(name) for name in names))
    print(f"\n{'':<{width}}  " + "  ".join(f"{name:>{columns}}" for name in names) + f"  {'B - A':>{columns}}")
    for label, values in rows:
        cells = "  ".join(f"{value:>{columns}.3f}" for value in values)
        print(f"{label:<{width}}  {cells}  {values[1] - values[0]:>+{columns}.3f}")
    for run in runs:
        print(f"  {run['name']}: {run['description']} ({run['params'] / 1e6:.2f}M parameters)")


def panel_title(run: dict[str, Any], method: str) -> str:
    """The caption above one run's timeline in the comparison picture."""
    return f"run {run['run']}: {run['description']} ({method})"


def side_by_side(runs: list[dict[str, Any]], method: str) -> np.ndarray:
    """The final timelines of ``method``, A above B, each under a caption band (white-padded to one width)."""
    panels = [caption(run["timelines"][method][None], [panel_title(run, method)])[0] for run in runs]
    width = max(panel.shape[1] for panel in panels)
    padded = [np.pad(panel, ((0, 0), (0, width - panel.shape[1]), (0, 0)), constant_values=255) for panel in panels]
    spacer = np.full((6, width, 3), 255, np.uint8)
    return np.concatenate([padded[0], spacer, padded[1]], axis=0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    use_threads(args.threads)
    runs = [train(args, "A"), train(args, "B")]

    print_table(runs)
    method = "gradtoken" if "gradtoken" in args.methods else args.methods[0]
    path = save_png(side_by_side(runs, method), Path(args.output_dir) / f"compare_{method}.png")
    print()
    print_path(f"Final {method} timelines, {runs[0]['name']} above {runs[1]['name']}", path)

    if args.logger == "tensorboard":
        parent = Path(args.output_dir).resolve()
        print_path("TensorBoard logs of both runs", parent)
        print("View them side by side with:")
        print(f"  {tensorboard_command(parent)}")
        print(f"The runs appear as {runs[0]['name']} and {runs[1]['name']}: their scalars (xai/<method>/iou, "
              "xai/<method>/entropy, val_acc, ...) are overlaid in one chart each; the Images tab shows each run's "
              "overlays and timelines per epoch.")
        if shutil.which("tensorboard") is None:
            print("(tensorboard is installed with lightning-xai; activate the same virtual environment to run it)")
    else:
        print("W&B run directories:")
        for run in runs:
            print_path(f"  {run['name']}", run["log_dir"])
        if os.environ.get("WANDB_MODE") == "offline":
            print("Offline runs; upload them later with:")
            print(f"  wandb sync {' '.join(str(run['log_dir'].resolve()) for run in runs)}")
            print(f"  (the xai/table images are staged in {staging_dir()}: keep that folder until you have synced)")
        print(f"In the W&B UI (project lightning-xai), group the runs by 'group' (compare-{args.vary}) to see their "
              "per-epoch xai/table tables and xai/<method>/overlay images side by side.")


if __name__ == "__main__":
    main()
