"""The examples run end to end (tiny settings): TensorBoard logs, timelines, a checkpoint that knows its class names,
the commands they print, their ``--help``, and the comparison of two runs."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import time
from pathlib import Path

import pytest
import torch
from readme_commands import tensorboard_command, with_logdir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_xai import render
from lightning_xai.demos import ViTClassifier, class_names

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(name: str, argv: list[str]) -> str:
    """Run ``examples/<name>.py`` with ``argv``; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        load(name).main(argv)
    return printed.getvalue()


def printed_path(text: str, label: str) -> Path:
    match = re.search(rf"^{re.escape(label)}\s*(\S+)$", text, flags=re.M)
    assert match, f"the example did not print {label!r}:\n{text}"
    return Path(match.group(1))


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    printed = run_main("train_vit", ["--epochs", "1", "--num-train", "128", "--num-val", "32", "--num-probes", "3",
                                     "--output-dir", str(out)])
    return out, printed


def test_train_vit_logs_to_tensorboard_and_saves_timelines(example_run):
    out, _ = example_run
    run_dir = next(out.rglob("events.out.tfevents.*")).parent
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert {"xai/gradtoken/overlay/0", "xai/c2f/overlay/2"} <= set(events.Tags()["images"])
    assert any(tag.startswith("xai/gradtoken/timeline") for tag in events.Tags()["images"])
    assert (run_dir / "xai" / "timeline_gradtoken.png").exists() and (run_dir / "xai" / "timeline_c2f.png").exists()


def test_train_vit_prints_the_readme_tensorboard_command_and_its_checkpoint(example_run):
    out, printed = example_run
    commands = [shlex.split(line) for line in printed.splitlines() if line.strip().startswith("tensorboard ")]
    assert commands == [with_logdir(tensorboard_command(), out.resolve())]
    checkpoint = printed_path(printed, "Checkpoint (with the class names):")
    assert checkpoint.is_file() and checkpoint.name == "last.ckpt" and out.resolve() in checkpoint.parents
    assert f"--checkpoint {checkpoint}" in printed  # the explain_checkpoint command it prints
    hyperparameters = torch.load(checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert list(hyperparameters["class_names"]) == list(class_names("texture", 4))


def test_explain_checkpoint_writes_overlays_and_names_the_classes(example_run, tmp_path):
    _, printed = example_run
    checkpoint = printed_path(printed, "Checkpoint (with the class names):")
    text = run_main("explain_checkpoint", ["--checkpoint", str(checkpoint), "--output", str(tmp_path),
                                           "--methods", "gradtoken", "rollout"])
    inputs = sorted((tmp_path / "inputs").glob("*.png"))
    assert len(inputs) == 8
    for method in ("gradtoken", "rollout"):
        assert len(list((tmp_path / method).glob("*.png"))) == 8
    rows = [line.split() for line in text.splitlines() if line.startswith("sample")]
    assert len(rows) == 8 and all(row[1] in class_names("texture", 4) for row in rows), text
    with pytest.raises(SystemExit):
        load("explain_checkpoint").main(["--checkpoint", str(tmp_path / "missing.ckpt")])


def printed_paths(text: str) -> list[str]:
    """Every path-like word the example printed (containing a ``/``, not a URL or a ``key/name`` tag)."""
    words = [word.strip(",;:()") for line in text.splitlines() for word in line.split()]
    return [word for word in words if "/" in word and "://" not in word and not word.startswith(("xai/", "<"))
            and (word.startswith((".", "/")) or "." in Path(word).name or word.endswith("/"))]


def test_examples_print_absolute_paths(example_run):
    _, printed = example_run
    paths = printed_paths(printed)
    assert paths and all(Path(path).is_absolute() for path in paths), paths


def test_explain_checkpoint_writes_under_the_run_folder_by_default(example_run, tmp_path, monkeypatch):
    _, printed = example_run
    checkpoint = printed_path(printed, "Checkpoint (with the class names):")
    monkeypatch.chdir(tmp_path)
    text = run_main("explain_checkpoint", ["--checkpoint", str(checkpoint), "--methods", "rollout"])
    assert not list(tmp_path.iterdir()), "it wrote into the current folder"
    written = checkpoint.parent.parent / "explanations" / "rollout"
    assert len(list(written.glob("*.png"))) == 8
    assert printed_path(text, "rollout overlays:") == written.resolve()
    assert all(Path(path).is_absolute() for path in printed_paths(text))


def test_class_names_must_match_the_number_of_classes():
    with pytest.raises(ValueError, match="3 names"):
        ViTClassifier(num_classes=3, image_size=32, class_names=["a", "b"], patch_size=8, depth=1, embed_dim=16,
                      num_heads=2)


@pytest.mark.parametrize("name", ["train_vit", "compare_runs", "explain_checkpoint"])
def test_help_describes_every_option_and_shows_each_default_once(name):
    parser = load(name).build_parser()
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{name} --{action.dest} has no help text"
        if action.default is not None:
            assert f"(default: {action.default})".replace("'", "") in text.replace("'", ""), action.dest
        assert text.count("(default:") == len(re.findall(r"\(default:", text))
    assert not re.search(r"\(default: [^)]*\) \(default:", text), "a default is shown twice"


def test_compare_runs_writes_one_folder_per_run_and_a_readable_picture(tmp_path):
    printed = run_main("compare_runs", ["--epochs", "1", "--num-train", "64", "--num-val", "16", "--num-probes", "2",
                                        "--batch-size", "32", "--methods", "gradtoken", "--output-dir",
                                        str(tmp_path)])
    for run in ("augment-A", "augment-B"):
        assert next((tmp_path / run).glob("events.out.tfevents.*"))
    assert not (tmp_path / "compare").exists()
    commands = [shlex.split(line) for line in printed.splitlines() if line.strip().startswith("tensorboard ")]
    assert commands == [with_logdir(tensorboard_command(), tmp_path.resolve())]
    picture = tmp_path / "compare_gradtoken.png"
    assert picture.is_file()
    compare = load("compare_runs")
    width = render.timeline([render.overlay(torch.zeros(2, 3, 32, 32), torch.zeros(2, 32, 32))] * 2, ["init", 0],
                            row_labels=["#0", "#1"]).shape[1]
    for run, description in (("A", "augment off"), ("B", "augment on")):
        title = compare.panel_title({"run": run, "name": f"augment-{run}", "description": description}, "gradtoken")
        assert " ".join(render.fit_caption(title, width)) == title  # drawn in full over a two-epoch timeline
        assert description in title and "gradtoken" in title


def test_train_vit_offline_wandb_run_keeps_its_table_images_in_the_output_dir(tmp_path, monkeypatch):
    """W&B stages the per-epoch table's image cells outside the run folder (``$WANDB_DATA_DIR/artifacts/staging``)
    and the run's ``.wandb`` file refers to them by absolute path: ``wandb sync`` needs them. Offline, the example
    points ``WANDB_DATA_DIR`` into its output folder and prints where they are."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)  # restored (removed) after the test
    printed = run_main("train_vit", ["--logger", "wandb", "--epochs", "1", "--num-train", "64", "--num-val", "16",
                                     "--num-probes", "2", "--methods", "gradtoken", "--output-dir", str(tmp_path)])
    run_dir = Path(re.search(r"wandb sync (\S+)", printed).group(1))
    assert run_dir.is_dir() and tmp_path.resolve() in run_dir.parents
    transaction_log = next(run_dir.glob("run-*.wandb"))
    deadline = time.monotonic() + 60  # wandb's service process may still be writing the log after finish()
    while True:  # tempfile names: "tmp" and 8 characters; the protobuf framing around them is not part of the path
        staged = re.findall(rb"/(?:[\w.-]+/)+artifacts/staging/tmp[a-z0-9_]{8}", transaction_log.read_bytes())
        if staged or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert staged, "no staged artifact files referenced by the run"
    for path in {Path(p.decode()) for p in staged}:
        assert tmp_path.resolve() / "wandb-data" in path.parents and path.is_file(), path
    assert str(tmp_path.resolve() / "wandb-data" / "artifacts" / "staging") in printed


def test_the_examples_tensorboard_command_is_the_readmes():
    """Every example prints ``demos.cli.tensorboard_command``: it must be the README's, with the folder."""
    from lightning_xai.demos.cli import tensorboard_command as examples_command

    assert shlex.split(examples_command("runs/x")) == with_logdir(tensorboard_command(), "runs/x")
