"""The examples run end to end (tiny settings): TensorBoard logs, timelines, checkpoint overlays."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    load("train_vit").main(["--epochs", "1", "--num-train", "128", "--num-val", "32", "--num-probes", "3",
                            "--output-dir", str(out)])
    return out


def test_train_vit_logs_to_tensorboard_and_saves_timelines(example_run, capsys):
    run_dir = next(example_run.rglob("events.out.tfevents.*")).parent
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert {"xai/gradtoken/overlay", "xai/c2f/overlay", "xai/gradtoken/timeline"} <= set(events.Tags()["images"])
    assert (run_dir / "xai" / "timeline_gradtoken.png").exists() and (run_dir / "xai" / "timeline_c2f.png").exists()
    assert next(example_run.rglob("*.ckpt"))


def test_explain_checkpoint_writes_overlays(example_run, tmp_path, capsys):
    checkpoint = next(example_run.rglob("*.ckpt"))
    load("explain_checkpoint").main(["--checkpoint", str(checkpoint), "--output", str(tmp_path),
                                     "--methods", "gradtoken", "rollout"])
    inputs = sorted((tmp_path / "inputs").glob("*.png"))
    assert len(inputs) == 8
    for method in ("gradtoken", "rollout"):
        assert len(list((tmp_path / method).glob("*.png"))) == 8
    with pytest.raises(SystemExit):
        load("explain_checkpoint").main(["--checkpoint", str(tmp_path / "missing.ckpt")])
