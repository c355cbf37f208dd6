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


def test_pretrained_without_network_falls_back_to_scratch(tmp_path):
    """``--pretrained`` offline: a warning that says so, and a model built from scratch instead of a crash.
    The hub is forced offline with an empty cache (set before import), so nothing is downloaded."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings\n"
        "from lightning_xai.demos import create_vit\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    model = create_vit('vit_tiny_patch16_224', num_classes=3, image_size=32, pretrained=True,"
        " patch_size=8, depth=1)\n"
        "print(type(model).__name__, model.head.out_features)\n"
        "print([str(w.message) for w in caught if 'pretrained' in str(w.message)])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "VisionTransformer 3"
    assert "could not load pretrained weights for 'vit_tiny_patch16_224'" in lines[1]
    assert "Training from scratch instead" in lines[1]
