"""The callbacks with a real Trainer and a real timm ViT LightningModule, logging to real loggers."""

from __future__ import annotations

import gc
import glob
import io
import json
import random
import subprocess
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import run_two_processes, wandb_history
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_xai.callbacks import C2FMonitor, ExplanationMonitor, GradTokenMonitor
from lightning_xai.demos import SyntheticDataModule, ViTClassifier
from lightning_xai.explainers import Explainer

TINY = dict(model_name="vit_tiny_patch16_224", num_classes=4, image_size=32, patch_size=8, embed_dim=48, depth=2,
            num_heads=3)


def datamodule(**kwargs) -> SyntheticDataModule:
    options = dict(family="shape", num_classes=4, image_size=32, num_train=128, num_val=64, batch_size=32, seed=0,
                   val_return_mask=True)
    options.update(kwargs)
    return SyntheticDataModule(**options)


def trainer(tmp_path: Path, callbacks=(), logger=False, epochs=2, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), num_sanity_val_steps=1, deterministic=True)
    options.update(kwargs)
    return pl.Trainer(**options)


def fit(tmp_path, callbacks=(), logger=False, epochs=2, seed=0, **kwargs):
    pl.seed_everything(seed, workers=True)
    module = ViTClassifier(**TINY)
    run = trainer(tmp_path, callbacks, logger, epochs, **kwargs)
    run.fit(module, datamodule=datamodule())
    return module, run


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    monitor = ExplanationMonitor(methods=["gradtoken", "c2f"], num_probes=4, explain_at_fit_start=True, save_raw=True)
    module, run = fit(tmp, [monitor], TensorBoardLogger(str(tmp), name="run"), epochs=3)
    events = EventAccumulator(run.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return monitor, run, events


def test_tensorboard_images_per_epoch_with_expected_sizes(tensorboard_run):
    monitor, run, events = tensorboard_run
    tags = events.Tags()
    # one step axis: the steps Lightning logs val_loss at (4 batches an epoch, logged before the 4th batch is
    # counted); the fit-start baseline is the first point of the same tags, at step 0
    val_steps = [e.step for e in events.Scalars("val_loss")]
    assert val_steps == [3, 7, 11]
    for method in ("gradtoken", "c2f"):
        # one picture per probe (a grid of all probes is a squeezed strip in Time Series): the probe image and
        # 1 target as columns; tiles are upscaled 32 -> 96 px plus a caption
        assert f"xai/{method}/overlay" not in tags["images"] and f"xai/{method}/overlay/4" not in tags["images"]
        for probe in range(4):
            overlays = events.Images(f"xai/{method}/overlay/{probe}")
            assert [e.step for e in overlays] == [0, *val_steps]
            assert 2 * 96 <= overlays[0].width < 3 * 96 and 96 < overlays[0].height < 2 * 96
        # the timeline as one small picture per probe (the whole-run picture is too wide for TensorBoard's cards)
        assert f"xai/{method}/timeline" not in tags["images"] and f"xai/{method}/timeline/4" not in tags["images"]
        for probe in range(4):
            timeline = events.Images(f"xai/{method}/timeline/{probe}")
            assert [e.step for e in timeline] == [0, *val_steps]
            assert len({(e.width, e.height) for e in timeline}) == 1  # 4 events: one row of 4 tiles, fixed width
        for scalar in ("entropy", "iou", "energy_pointing_game"):
            assert [e.step for e in events.Scalars(f"xai/{method}/{scalar}")] == [0, *val_steps], scalar
        assert [e.step for e in events.Scalars(f"xai/{method}/similarity_prev")] == val_steps
        values = [e.value for e in events.Scalars(f"xai/{method}/iou")]
        assert len(values) == 4 and all(0 <= v <= 1 for v in values)
    assert not [tag for tag in tags["images"] + tags["scalars"] if "init" in tag]  # no separate baseline tags
    assert [e.step for e in events.Images("xai/probes/0")] == [0]  # probe images logged once, not every epoch
    assert [e.step for e in events.Scalars("xai/probe_accuracy")] == [0, *val_steps]


def test_tensorboard_images_decode_to_the_rendered_pixels(tensorboard_run):
    monitor, _, events = tensorboard_run
    for method in ("gradtoken", "c2f"):
        for probe, expected in enumerate(monitor.records.board.probe_timelines(method)):
            last = events.Images(f"xai/{method}/timeline/{probe}")[-1]
            decoded = np.asarray(Image.open(io.BytesIO(last.encoded_image_string)).convert("RGB"))
            assert (last.height, last.width) == decoded.shape[:2]
            np.testing.assert_array_equal(decoded, expected)  # lossless, same orientation


def test_save_raw_writes_tensors_per_epoch(tensorboard_run):
    monitor, run, _ = tensorboard_run
    files = sorted(Path(run.log_dir).rglob("raw/c2f/*.pt"))
    assert [f.stem for f in files] == ["epoch_0000", "epoch_0001", "epoch_0002", "start"]  # start: fit-start baseline
    saved = torch.load(files[0])
    assert saved["raw"].shape == (4, 1, 32, 32) and saved["targets"].shape == (4, 1)
    assert (saved["epoch"], saved["step"]) == (0, 3)


def test_csv_logger_gets_png_files_and_scalars(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    monitor = GradTokenMonitor(num_probes=3)
    fit(tmp_path, [monitor], logger, epochs=2)
    root = Path(logger.log_dir) / "xai"
    assert sorted(p.name for p in (root / "gradtoken").glob("*.png")) == ["epoch_0000.png", "epoch_0001.png",
                                                                          "timeline.png"]
    assert len(list((root / "probes").glob("*.png"))) == 3
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "xai/gradtoken/entropy" in metrics and "xai/gradtoken/iou" in metrics


def test_no_logger_falls_back_to_png_under_the_run_directory(tmp_path):
    fit(tmp_path, [C2FMonitor(num_probes=2, granularity="clusters")], logger=False, epochs=1)
    assert (tmp_path / "xai" / "c2f" / "epoch_0000.png").exists()
    assert "xai/c2f/entropy" in (tmp_path / "xai" / "metrics.csv").read_text()


def test_wandb_offline_run_holds_images_and_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb

    logger = WandbLogger(project="lightning-xai-test", save_dir=str(tmp_path), offline=True)
    fit(tmp_path, [ExplanationMonitor(methods=["gradtoken", "rollout"], num_probes=3)], logger, epochs=2)
    wandb.finish()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    files = Path(runs[0]) / "files"
    images = [p.relative_to(files).as_posix() for p in files.rglob("*.png")]
    assert sum("xai/gradtoken/overlay" in p for p in images) == 2  # one per epoch
    assert sum("xai/rollout/timeline" in p for p in images) == 2
    assert sum("xai/probes" in p for p in images) == 3  # the probe images, uploaded once
    tables = sorted(files.rglob("*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["epoch", "step", "probe", "target", "target_name", "probability", "label",
                                "gradtoken", "rollout"]
    assert len(table["data"]) == 3 and table["data"][0][:2] == [1, 7]
    # one step axis in W&B too: each explanation shares the W&B row (and so `_step`) of the validation's metrics,
    # at the trainer/global_step Lightning logs val_loss at
    rows = [row for row in wandb_history(runs[0]) if "xai/gradtoken/entropy" in row]
    assert [row["trainer/global_step"] for row in rows] == [3, 7]
    assert all("val_loss" in row and row["xai/gradtoken/overlay/_type"] == "image-file" for row in rows)


class Recorder(Callback):
    """Records RNG states, modes, flags and hook counts around the monitor's hooks."""

    def __init__(self):
        self.states = []

    def _snap(self, module):
        return (
            torch.get_rng_state(),
            np.random.get_state()[1].copy(),
            random.getstate(),
            [m.training for m in module.modules()],
            [p.requires_grad for p in module.parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()),
        )

    def on_validation_epoch_end(self, trainer, module):
        self.states.append(self._snap(module))

    def on_train_epoch_end(self, trainer, module):
        self.states.append(self._snap(module))


def _same_snapshots(a, b):
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert a[3:] == b[3:]


@pytest.mark.parametrize("stage", ["validation", "train"])
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, stage):
    before, after = Recorder(), Recorder()
    monitor = ExplanationMonitor(methods=["gradtoken", "c2f", "vitcx"], num_probes=3, stage=stage,
                                 explain_at_fit_start=True, targets="topk")
    plain, plain_run = fit(tmp_path / "a", epochs=2)
    watched, watched_run = fit(tmp_path / "b", [before, monitor, after], epochs=2)
    for (name, p), q in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert q.grad is None or torch.equal(p.grad, q.grad)
    opt_a, opt_b = plain_run.optimizers[0].state_dict(), watched_run.optimizers[0].state_dict()
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][key][name])), name
    for key, value in plain_run.callback_metrics.items():
        assert torch.equal(value, watched_run.callback_metrics[key]), key
    assert len(before.states) == len(after.states) >= 2
    for a, b in zip(before.states, after.states, strict=True):
        _same_snapshots(a, b)
    assert monitor.explained == [(0, 0), (0, 3), (1, 7)]  # the fit-start baseline, then each epoch's last step


def test_no_growth_over_many_epochs(tmp_path):
    counts = []

    class Count(Callback):
        def on_validation_epoch_end(self, trainer, module):
            gc.collect()
            counts.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))

    monitor = ExplanationMonitor(methods=["gradtoken"], num_probes=2)
    pl.seed_everything(0)
    module = ViTClassifier(**TINY)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    data = datamodule(num_train=32, num_val=8)
    trainer(tmp_path, [monitor, Count()], epochs=30, num_sanity_val_steps=0, limit_train_batches=1).fit(module, data)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()) == hooks
    assert len(counts) == 30
    assert max(counts[5:]) - min(counts[5:]) <= 2, counts  # stable after warm-up, no per-epoch leak
    assert len(monitor.explained) == 30


def test_bf16_mixed_precision(tmp_path):
    monitor = ExplanationMonitor(methods=["gradtoken", "gae"], num_probes=2)
    logger = CSVLogger(str(tmp_path), name="bf16")
    fit(tmp_path, [monitor], logger, epochs=1, precision="bf16-mixed")
    assert monitor.last_results["gradtoken"].maps.dtype == torch.float32
    assert torch.isfinite(monitor.last_results["gae"].maps).all()


def test_trainer_validate_runs_in_inference_mode(tmp_path):
    monitor = ExplanationMonitor(methods=["gradtoken", "c2f"], num_probes=2)
    pl.seed_everything(0)
    module = ViTClassifier(**TINY)
    trainer(tmp_path, [monitor], logger=CSVLogger(str(tmp_path), name="val")).validate(module, datamodule())
    assert set(monitor.last_results) == {"gradtoken", "c2f"}
    assert torch.isfinite(monitor.last_results["gradtoken"].maps).all()


class _Failing(Explainer):
    name = "test_failing"

    def compute(self, x, targets, geom):
        raise RuntimeError("deliberate failure")


def test_an_explanation_failure_warns_and_training_goes_on(tmp_path, registered):
    registered(_Failing)
    monitor = ExplanationMonitor(methods=["test_failing", "gradtoken"], num_probes=2)
    with pytest.warns(RuntimeWarning, match=r"'test_failing' failed at epoch 0.*deliberate failure"):
        _, run = fit(tmp_path, [monitor], epochs=2)
    assert run.current_epoch == 2 and set(monitor.last_results) == {"gradtoken"}
    with pytest.raises(RuntimeError, match="deliberate failure"):
        fit(tmp_path, [ExplanationMonitor(methods=["test_failing"], num_probes=2, on_error="raise")], epochs=1)


def test_misconfiguration_raises_before_the_first_epoch(tmp_path):
    class CNN(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return self(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="no supported Vision Transformer"):
        trainer(tmp_path, [ExplanationMonitor(stage="train")]).fit(CNN(), datamodule())
    class NoImageWriter(TensorBoardLogger):  # a TensorBoard logger whose writer cannot take images
        @property
        def experiment(self):
            return object()

    with pytest.raises(TypeError, match="cannot take the explanation images"):
        fit(tmp_path, [ExplanationMonitor()], logger=NoImageWriter(str(tmp_path)))
    wrong_size = ExplanationMonitor(probe_images=torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="built for 32x32"):
        fit(tmp_path, [wrong_size])
    with pytest.raises(ValueError, match="out of range"):
        fit(tmp_path, [ExplanationMonitor(targets=7)])


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="unknown method 'gradcam'"):
        ExplanationMonitor(methods=["gradcam"])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['layer'\]"):
        ExplanationMonitor(methods={"gradtoken": {"layer": 3}})
    with pytest.raises(ValueError, match="stage must be one of"):
        ExplanationMonitor(stage="test")
    with pytest.raises(ValueError, match="every_n_epochs must be an int >= 1"):
        ExplanationMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="targets must be one of"):
        ExplanationMonitor(targets="top")
    with pytest.raises(ValueError, match="probe_images must be a float tensor"):
        ExplanationMonitor(probe_images=torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="needs probe_labels"):
        ExplanationMonitor(probe_images=torch.zeros(2, 3, 32, 32), targets="label")


def test_every_n_epochs_and_user_probes_with_labels(tmp_path):
    data = datamodule()
    data.setup("fit")
    images, labels, masks = data.val_set.batch([0, 1, 2])
    monitor = ExplanationMonitor(methods=["gradtoken"], probe_images=images, probe_labels=labels, probe_masks=masks,
                                 targets="label", every_n_epochs=2)
    fit(tmp_path, [monitor], epochs=4)
    assert [epoch for epoch, _ in monitor.explained] == [1, 3]
    assert monitor.probe.indices is None and torch.equal(monitor.probe.labels, labels)


def test_resume_explains_the_same_probes(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = ExplanationMonitor(methods=["gradtoken"], num_probes=4, seed=1)
    fit(tmp_path, [first, checkpoints], epochs=2, enable_checkpointing=True)
    resumed = ExplanationMonitor(methods=["gradtoken"], num_probes=4, seed=99)  # another seed: state must win
    pl.seed_everything(0)
    run = trainer(tmp_path, [resumed, ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"))], epochs=4,
                  enable_checkpointing=True)
    run.fit(ViTClassifier(**TINY), datamodule=datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.probe.indices == first.probe.indices
    assert torch.equal(resumed.probe.images, first.probe.images)
    # the shortcut check's references: their indices are saved, their images read again (not the new seed's draw)
    assert resumed.state_dict()["reference_indices"] == first.state_dict()["reference_indices"] is not None
    assert torch.equal(resumed.records.shortcut.references[0], first.records.shortcut.references[0])
    assert [epoch for epoch, _ in resumed.explained] == [0, 1, 2, 3]


DDP_SCRIPT = """
import os, sys, json, torch, lightning.pytorch as pl
sys.path.insert(0, {tests!r})
from test_callbacks import TINY, datamodule
from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.demos import ViTClassifier

class Where(pl.Callback):
    def __init__(self, monitor):
        self.monitor = monitor

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking or not self.monitor.last_results:
            return
        assert not isinstance(self.monitor.runner.module, torch.nn.parallel.DistributedDataParallel)
        with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}_epoch{{trainer.current_epoch}}"), "w") as f:
            f.write("explained")

if __name__ == "__main__":
    pl.seed_everything(0)
    monitor = ExplanationMonitor(methods=["gradtoken", "c2f"], num_probes=2)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, default_root_dir={out!r},
                         callbacks=[monitor, Where(monitor)])
    trainer.fit(ViTClassifier(**TINY), datamodule=datamodule())
"""


def test_ddp_two_processes_only_rank_zero_logs(tmp_path):
    done = run_two_processes(DDP_SCRIPT, tmp_path, "ddp_run.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0_epoch0", "rank0_epoch1"]
    assert sorted(p.name for p in (tmp_path / "xai" / "gradtoken").glob("*.png"))[:2] == ["epoch_0000.png",
                                                                                          "epoch_0001.png"]


def test_probe_drawing_leaves_the_dataset_and_rng_alone(tmp_path):
    data = datamodule()
    data.setup("fit")
    monitor = ExplanationMonitor(methods=["rollout"], num_probes=5, seed=3)
    other = ExplanationMonitor(methods=["rollout"], num_probes=5, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(tmp_path / "a", [monitor], epochs=1)
        fit(tmp_path / "b", [other], epochs=1)
    assert monitor.probe.indices == other.probe.indices and len(monitor.probe.indices) == 5
    images, _, masks = data.val_set.batch(monitor.probe.indices)
    assert torch.equal(monitor.probe.images, images) and torch.equal(monitor.probe.masks, masks)


DDP_STOP_SCRIPT = """
import os, sys, lightning.pytorch as pl
sys.path.insert(0, {tests!r})
from test_callbacks import TINY, datamodule
from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.demos import ViTClassifier

class Ended(pl.Callback):
    def on_fit_end(self, trainer, module):
        with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}_ended_epoch{{trainer.current_epoch}}"), "w"):
            pass

if __name__ == "__main__":
    pl.seed_everything(0)
    # no references (the rate's rule), threshold 0 and patience 1: the alarm fires at the first event (4 probes of
    # 4 labels), on rank 0 only
    monitor = ExplanationMonitor(methods=["rollout"], num_probes=4, targets="label", shortcut_threshold=0.0,
                                 shortcut_patience=1, shortcut_references=0, stop_on_shortcut=True)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, default_root_dir={out!r},
                         callbacks=[monitor, Ended()])
    trainer.fit(ViTClassifier(**TINY), datamodule=datamodule())
"""


def test_ddp_stop_on_shortcut_stops_every_rank(tmp_path):
    try:  # rank 0 stopping alone leaves rank 1 waiting in its next all-reduce: a hang, not an error
        done = run_two_processes(DDP_STOP_SCRIPT, tmp_path, "ddp_stop.py", timeout=240)
    except subprocess.TimeoutExpired as hang:
        raise AssertionError(f"the two ranks did not stop together: {sorted(p.name for p in tmp_path.iterdir())}"
                             ) from hang
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shortcut alarm" in done.stderr
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0_ended_epoch1", "rank1_ended_epoch1"]
