"""Issue 12's cases, each with a real Trainer: data and modules as users write them, and misconfigurations that
must fail at construction or before the first epoch with a message naming the cause and the fix."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_callbacks import TINY, datamodule, fit, trainer
from torch.utils.data import DataLoader, Dataset

from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.demos import ViTClassifier, create_vit
from lightning_xai.explainers import Explainer
from lightning_xai.explainers.perturbation import WARNED_ONCE


def loaders(dataset_type, batch_size=32, **kwargs):
    data = datamodule(**kwargs)
    data.setup("fit")
    return (DataLoader(dataset_type(data.train_set), batch_size=batch_size),
            DataLoader(dataset_type(data.val_set), batch_size=batch_size))


class Steps(Callback):
    """Counts training batches, to prove a failure came before the first one."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


# -- 1, 2: data the defaults read, and data they cannot ---------------------------------------------------------
class DictSamples(Dataset):
    def __init__(self, base, keys=("pixel_values", "labels")):
        self.base, self.keys = base, keys

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index][:2]
        return {self.keys[0]: image, self.keys[1]: label}


class DictClassifier(ViTClassifier):
    def shared_step(self, batch, stage):
        return super().shared_step((batch["pixel_values"], batch["labels"]), stage)


def test_case1_dict_batches_hugging_face_style(tmp_path):
    train, val = loaders(DictSamples)
    monitor = ExplanationMonitor(methods=["rollout"], num_probes=3, targets="label")
    pl.seed_everything(0)
    trainer(tmp_path, [monitor], epochs=1).fit(DictClassifier(**TINY), train, val)
    assert monitor.probe.labels.shape == (3,) and monitor.explained == [(0, 3)]
    assert torch.equal(monitor.last_results["rollout"].targets[:, 0], monitor.probe.labels)


class OddKeys(DictSamples):
    def __init__(self, base):
        super().__init__(base, keys=("img_tensor", "cls"))


class OddClassifier(ViTClassifier):
    def shared_step(self, batch, stage):
        return super().shared_step((batch["img_tensor"], batch["cls"]), stage)


def test_case1_batch_transform_reads_what_the_defaults_cannot(tmp_path):
    train, val = loaders(OddKeys)
    steps = Steps()
    with pytest.raises(ValueError, match=r"keys \['cls', 'img_tensor'\].*batch_transform="):
        trainer(tmp_path, [ExplanationMonitor(methods=["rollout"]), steps], epochs=1).fit(
            OddClassifier(**TINY), train, val)
    assert steps.batches == 0
    monitor = ExplanationMonitor(methods=["rollout"], num_probes=2,
                                 batch_transform=lambda batch: (batch["img_tensor"], batch["cls"], None))
    trainer(tmp_path, [monitor], epochs=1).fit(OddClassifier(**TINY), train, val)
    assert monitor.probe.images.shape == (2, 3, 32, 32) and monitor.explained == [(0, 3)]


class WithExtra(Dataset):
    def __init__(self, base, extra):
        self.base, self.extra = base, extra

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index][:2]
        return image, label, (index if self.extra == "index" else f"image_{index:04d}.png")


@pytest.mark.parametrize("extra", ["index", "filename"])
def test_case2_samples_with_an_index_or_a_filename(tmp_path, extra):
    train, val = loaders(lambda base: WithExtra(base, extra))
    monitor = ExplanationMonitor(methods=["rollout"], num_probes=2)
    trainer(tmp_path, [monitor], epochs=1).fit(ViTClassifier(**TINY), train, val)
    assert monitor.probe.masks is None and monitor.probe.labels.shape == (2,)
    assert set(monitor.last_results) == {"rollout"}


# -- 3, 4: when and how often ---------------------------------------------------------------------------------------
def test_case3_every_validation_within_epochs_named_by_step(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = ExplanationMonitor(methods=["rollout"], num_probes=2)
    fit(tmp_path, [monitor], logger, epochs=2, val_check_interval=0.5)
    assert monitor.explained == [(0, 1), (0, 3), (1, 5), (1, 7)]  # two validations an epoch, both explained
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    val_steps = [e.step for e in events.Scalars("val_loss")]
    assert [e.step for e in events.Images("xai/rollout/overlay/1")] == val_steps == [1, 3, 5, 7]
    every_other = ExplanationMonitor(methods=["rollout"], num_probes=2, every_n_validations=2)
    fit(tmp_path / "b", [every_other], epochs=2, val_check_interval=0.5)
    assert every_other.explained == [(0, 3), (1, 7)]
    names = sorted(p.name for p in (tmp_path / "b" / "xai" / "rollout").glob("epoch_*.png"))
    assert names == ["epoch_0000_step_000003.png", "epoch_0001_step_000007.png"]  # named by epoch and step


def test_case4_second_fit_with_the_same_instance(tmp_path):
    monitor = ExplanationMonitor(methods=["rollout"], num_probes=2)
    module = ViTClassifier(**TINY)
    trainer(tmp_path / "head", [monitor], epochs=1).fit(module, datamodule())
    assert monitor.explained == [(0, 3)]
    trainer(tmp_path / "all", [monitor], epochs=2).fit(module, datamodule())
    assert monitor.explained == [(0, 3), (1, 7)]  # the second run is explained from its start
    assert sorted(p.name for p in (tmp_path / "all" / "xai" / "rollout").glob("epoch_*.png")) == [
        "epoch_0000.png", "epoch_0001.png"]


# -- 5, 6, 8, 9: modules as users write them ----------------------------------------------------------------------
class LateViT(ViTClassifier):
    """Builds its ViT in configure_model (or setup), like models too large to build eagerly."""

    def __init__(self, hook="configure_model", **kwargs):
        super().__init__(**kwargs)
        del self.model
        self.hook = hook

    def _build(self):
        if not hasattr(self, "model"):
            arch = {k: v for k, v in TINY.items() if k not in ("model_name", "num_classes", "image_size")}
            self.model = create_vit(TINY["model_name"], TINY["num_classes"], TINY["image_size"], **arch)

    def configure_model(self):
        if self.hook == "configure_model":
            self._build()

    def setup(self, stage):
        if self.hook == "setup":
            self._build()


@pytest.mark.parametrize("hook", ["configure_model", "setup"])
def test_case5_vit_built_in_configure_model_or_setup(tmp_path, hook):
    monitor = ExplanationMonitor(methods=["gradtoken"], num_probes=2)
    module = LateViT(hook=hook, **TINY)
    trainer(tmp_path, [monitor], epochs=1).fit(module, datamodule())
    assert monitor.runner.handle.vit is module.model and monitor.explained == [(0, 3)]


def test_case5_no_vit_at_all_fails_before_the_first_epoch(tmp_path):
    class Never(LateViT):
        def configure_model(self):
            self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))

    steps = Steps()
    with pytest.raises(TypeError, match="no supported Vision Transformer"):
        trainer(tmp_path, [ExplanationMonitor(), steps], epochs=1).fit(Never(**TINY), datamodule())
    assert steps.batches == 0


class WithEMA(ViTClassifier):
    """An EMA copy registered before the ViT the forward runs."""

    def __init__(self, average=False, **kwargs):
        super().__init__(**kwargs)
        model = self.model
        del self.model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.model = model
        self.average = average

    def forward(self, images):
        logits = self.model(images)
        return (logits + self.ema(images)) / 2 if self.average else logits


def test_case6_the_vit_the_forward_runs_is_explained(tmp_path, caplog):
    monitor = ExplanationMonitor(methods=["gradtoken"], num_probes=2)
    module = WithEMA(**TINY)
    with caplog.at_level("INFO"):
        trainer(tmp_path, [monitor], epochs=1).fit(module, datamodule())
    assert monitor.runner.handle.vit is module.model
    assert "explaining 'model', the ViT your forward runs (also found 'ema'" in caplog.text
    with pytest.raises(ValueError, match=r"found 2 Vision Transformers .*'ema', 'model'.*pass vit="):
        trainer(tmp_path, [ExplanationMonitor(methods=["gradtoken"])], epochs=1).fit(
            WithEMA(average=True, **TINY), datamodule())
    chosen = ExplanationMonitor(methods=["gradtoken"], num_probes=2, vit="ema")
    both = WithEMA(average=True, **TINY)
    trainer(tmp_path, [chosen], epochs=1).fit(both, datamodule())
    assert chosen.runner.handle.vit is both.ema


class LinearProbe(ViTClassifier):
    def forward(self, images):
        with torch.no_grad():
            features = self.model.forward_features(images)
        return self.model.forward_head(features)


def test_case8_backbone_under_no_grad(tmp_path):
    steps = Steps()
    with pytest.raises(ValueError, match=r"without gradients .*torch.no_grad\(\).*\['gradtoken'\]"):
        trainer(tmp_path, [ExplanationMonitor(methods=["gradtoken", "rollout"]), steps], epochs=1).fit(
            LinearProbe(**TINY), datamodule())
    assert steps.batches == 0
    monitor = ExplanationMonitor(methods=["rollout", "raw_attention"], num_probes=2)  # gradient-free methods work
    trainer(tmp_path, [monitor], epochs=1).fit(LinearProbe(**TINY), datamodule())
    assert set(monitor.last_results) == {"rollout", "raw_attention"}


class FeaturesAndLogits(ViTClassifier):
    def forward(self, images):
        features = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        return features, self.model.head(features)

    def shared_step(self, batch, stage):
        images, labels = batch[0], batch[1]
        loss = torch.nn.functional.cross_entropy(self(images)[1], labels)
        self.log(f"{stage}_loss", loss)
        return loss


class DictInput(ViTClassifier):
    def forward(self, batch):
        return self.model(batch["pixel_values"])

    def shared_step(self, batch, stage):
        loss = torch.nn.functional.cross_entropy(self({"pixel_values": batch[0]}), batch[1])
        self.log(f"{stage}_loss", loss)
        return loss


def test_case9_forward_returning_features_and_logits_or_taking_a_dict(tmp_path):
    with pytest.raises(TypeError, match=r"tuple of 2: \[\(1, 48\), \(1, 4\)\].*output_transform="):
        trainer(tmp_path, [ExplanationMonitor(methods=["rollout"])], epochs=1).fit(
            FeaturesAndLogits(**TINY), datamodule())
    monitor = ExplanationMonitor(methods=["gradtoken"], num_probes=2, output_transform=lambda out: out[1])
    trainer(tmp_path, [monitor], epochs=1).fit(FeaturesAndLogits(**TINY), datamodule())
    assert monitor.last_results["gradtoken"].targets.max() < 4
    with pytest.raises(IndexError, match=r"DictInput.forward\(images\) on the probe images failed.*forward="):
        trainer(tmp_path, [ExplanationMonitor(methods=["rollout"])], epochs=1).fit(DictInput(**TINY), datamodule())
    monitor = ExplanationMonitor(methods=["gradtoken"], num_probes=2,
                                 forward=lambda module, images: module({"pixel_values": images}))
    trainer(tmp_path, [monitor], epochs=1).fit(DictInput(**TINY), datamodule())
    assert set(monitor.last_results) == {"gradtoken"}


# -- 7: no validation loop --------------------------------------------------------------------------------------
def test_case7_no_validation_loop(tmp_path):
    steps = Steps()
    with pytest.raises(ValueError, match=r"no validation loop \(limit_val_batches=0\).*stage='train'"):
        fit(tmp_path, [ExplanationMonitor(methods=["rollout"]), steps], epochs=1, limit_val_batches=0)
    assert steps.batches == 0
    monitor = ExplanationMonitor(methods=["rollout"], stage="train", num_probes=2)
    fit(tmp_path, [monitor], epochs=1, limit_val_batches=0)
    assert monitor.explained == [(0, 3)]


# -- 10, small ones: arguments checked at construction ------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cmap": "nope"}, "cmap must be a matplotlib colour map"),
    ({"targets": -1}, r"class indices \(ints >= 0\)"),
    ({"targets": []}, "non-empty list"),
    ({"seed": "a"}, "seed must be an int"),
    ({"alpha": 2}, "alpha must be a number in"),
    ({"mean": (0.5, 0.5, 0.5)}, "mean and std go together"),
    ({"every_n_validations": 0}, "every_n_validations must be an int >= 1"),
    ({"forward": "model"}, "forward must be a callable"),
    ({"probe_images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, "got dtype torch.uint8"),
    ({"probe_split": "test"}, r"probe_split must be one of \('val', 'train'\)"),
    ({"num_probes": 0}, "num_probes must be an int >= 1"),
    ({"top_k": 1.5}, "top_k must be an int >= 1"),
    ({"batch_transform": "pixel_values"}, "batch_transform must be a callable"),
    ({"targets": "label", "probe_images": torch.zeros(2, 3, 32, 32)}, "targets='label' needs probe_labels"),
])
def test_case10_arguments_fail_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ExplanationMonitor(**kwargs)


@pytest.mark.parametrize(("method", "options", "message"), [
    ("gradtoken", {"layers": 0}, "layers=0"),
    ("c2f", {"granularity": "x"}, "granularity"),
])
def test_case10_method_options_fail_at_construction(method, options, message):
    with pytest.raises(ValueError, match=message):
        ExplanationMonitor(methods={method: options})


def test_small_numpy_targets_are_accepted():
    assert ExplanationMonitor(targets=np.int64(2)).probes.targets == 2
    assert ExplanationMonitor(targets=np.array([0, 3])).probes.targets == [0, 3]


def test_small_num_probes_above_the_dataset_size_warns(tmp_path):
    monitor = ExplanationMonitor(methods=["rollout"], num_probes=100)
    with pytest.warns(UserWarning, match="num_probes=100 but the dataset has 64 samples"):
        fit(tmp_path, [monitor], epochs=1)
    assert len(monitor.probe.images) == 64


def test_small_meta_device_model_gets_a_clear_error():
    from lightning_xai.callbacks.probes import ProbeSet
    from lightning_xai.callbacks.runner import ProbeRunner

    with torch.device("meta"):
        vit = create_vit(TINY["model_name"], 4, 32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    with pytest.raises(ValueError, match="meta device"):
        ProbeRunner(vit, {"rollout": {}}, ProbeSet(torch.randn(2, 3, 32, 32)))


# -- 11: one-hot and soft labels --------------------------------------------------------------------------------
def test_case11_one_hot_and_soft_labels(tmp_path):
    data = datamodule()
    data.setup("fit")
    images, labels, _ = data.val_set.batch([0, 1, 2, 3])
    soft = torch.nn.functional.one_hot(labels, 4).float() * 0.7 + 0.075  # label smoothing
    for given in (torch.nn.functional.one_hot(labels, 4), soft, labels.float()):
        monitor = ExplanationMonitor(methods=["rollout"], probe_images=images, probe_labels=given, targets="label")
        fit(tmp_path, [monitor], epochs=1)
        assert torch.equal(monitor.last_results["rollout"].targets[:, 0], labels)
        assert "xai/probe_accuracy" in monitor.last_scalars
    with pytest.raises(ValueError, match="neither class indices nor one-hot"):
        fit(tmp_path, [ExplanationMonitor(probe_images=images, probe_labels=labels.float() + 0.5, targets="label")])


# -- 12: diverged weights -----------------------------------------------------------------------------------------
def test_case12_nan_weights_warn_and_log_no_blank_maps(tmp_path):
    class Diverge(Callback):
        def on_validation_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    module.model.head.weight.fill_(float("nan"))

    monitor = ExplanationMonitor(methods=["rollout"], num_probes=2)
    logger = CSVLogger(str(tmp_path), name="nan")
    with pytest.warns(RuntimeWarning, match=r"epoch 1 .*NaN or infinite \(weights diverged\?\)"):
        fit(tmp_path, [Diverge(), monitor], logger, epochs=2, num_sanity_val_steps=0)
    root = tmp_path / "nan" / "version_0" / "xai"
    assert sorted(p.name for p in (root / "rollout").glob("epoch_*.png")) == ["epoch_0000.png"]
    assert {row.split(",")[0] for row in (root / "metrics.csv").read_text().splitlines()[1:]} == {"0"}


# -- 13: resume -----------------------------------------------------------------------------------------------
def test_case13_resume_keeps_timeline_similarity_targets_and_probes(tmp_path):
    class Scalars(Callback):
        def __init__(self, monitor):
            self.monitor, self.seen = monitor, []

        def on_validation_epoch_end(self, trainer, module):
            self.seen.append(dict(self.monitor.last_scalars))

    first = ExplanationMonitor(methods=["gradtoken"], num_probes=3, targets=[1, 2])
    fit(tmp_path, [first, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)], epochs=2,
        enable_checkpointing=True, num_sanity_val_steps=0)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    saved = next(s for s in state.values() if "probe" in s)
    assert saved["targets"] == [1, 2]  # targets are kept in the state
    resumed = ExplanationMonitor(methods=["gradtoken", "rollout"], num_probes=5, seed=9, targets=[1, 2])
    scalars = Scalars(resumed)
    pl.seed_everything(0)
    trainer(tmp_path, [resumed, scalars], epochs=3, num_sanity_val_steps=0).fit(
        ViTClassifier(**TINY), datamodule(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed.probe.images, first.probe.images)  # other methods, same probes
    assert resumed.explained == [(0, 3), (1, 7), (2, 11)]
    assert "xai/gradtoken/similarity_prev" in scalars.seen[0]  # compared with the event before the interruption
    assert "xai/rollout/similarity_prev" not in scalars.seen[0]  # a new method starts afresh
    columns = (resumed.timeline("gradtoken").shape[1], resumed.timeline("rollout").shape[1])
    assert columns[0] > columns[1]  # three events against one


# -- 14: sharded strategies ---------------------------------------------------------------------------------------
def test_case14_sharded_strategy_without_a_gather_is_refused_at_setup():
    """ModelParallelStrategy (FSDP2 / tensor parallel) is refused, naming FSDP and DDP as what works; FSDP itself is
    explained (tests/test_ranks.py)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    run = pl.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(ValueError, match="cannot explain under ModelParallelStrategy") as refused:
        ExplanationMonitor(methods=["rollout"], num_probes=2).setup(run, ViTClassifier(**TINY), "fit")
    assert "strategy='fsdp'" in str(refused.value) and "strategy='ddp'" in str(refused.value)


# -- precision, dtypes, failures and C2F's warning ------------------------------------------------------------
def test_bf16_true_model_and_float64_probes(tmp_path):
    monitor = ExplanationMonitor(methods=["gradtoken", "rollout"], num_probes=2)
    fit(tmp_path, [monitor], epochs=1, precision="bf16-true")
    assert monitor.last_results["gradtoken"].maps.dtype == torch.float32
    assert torch.isfinite(monitor.last_results["gradtoken"].maps).all()
    data = datamodule()
    data.setup("fit")
    images = data.val_set.batch([0, 1])[0].double()
    monitor = ExplanationMonitor(methods=["gradtoken"], probe_images=images)
    fit(tmp_path, [monitor], epochs=1)
    assert set(monitor.last_results) == {"gradtoken"}


def test_small_a_failing_forward_is_named_as_such(tmp_path):
    class Breaks(ViTClassifier):
        def forward(self, images):
            if not self.training and self.trainer.current_epoch == 1 and len(images) == 2:
                raise RuntimeError("forward broke")
            return super().forward(images)

    with pytest.warns(RuntimeWarning, match=r"the model's forward on the probes failed at epoch 1.*forward broke"):
        pl.seed_everything(0)
        trainer(tmp_path, [ExplanationMonitor(methods=["rollout"], num_probes=2)], epochs=2).fit(
            Breaks(**TINY), datamodule())


class NoPositiveMaskWarning(UserWarning):
    """Stands for C2F's warning (matched by class name)."""


class _Warns(Explainer):
    name = "test_no_positive_mask"

    def compute(self, x, targets, geom):
        from lightning_xai.explainers.base import RawMaps

        warnings.warn("no mask kept enough of the clean probability." + WARNED_ONCE, NoPositiveMaskWarning,
                      stacklevel=2)
        logits = self.logits(x)
        resolved = logits.argmax(-1, keepdim=True) if targets is None else targets
        return RawMaps(torch.rand(len(x), resolved.shape[1], *geom.grid), resolved,
                       logits.softmax(-1).gather(1, resolved))


def test_no_positive_mask_warning_once_per_run_on_its_own_line(tmp_path, capsys, registered):
    registered(_Warns)
    monitor = ExplanationMonitor(methods=["test_no_positive_mask"], num_probes=2)
    fit(tmp_path, [monitor], epochs=2, enable_progress_bar=True)
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).replace("\r", "\n").splitlines() if "'thresholds'" in line]
    assert len(lines) == 1, lines  # once per run, though both epochs warned
    assert "'test_no_positive_mask' at epoch 0 (step 3): no mask kept enough" in lines[0]
    assert lines[0].startswith("/") and "Epoch" not in lines[0]  # a line of its own, not glued to the bar
    assert "once per explainer" not in lines[0] and "Shown once per run" in lines[0]  # one claim, the true one
    with pytest.warns(NoPositiveMaskWarning, match="Shown once per run"):
        fit(tmp_path / "b", [ExplanationMonitor(methods=["test_no_positive_mask"], num_probes=2)], epochs=1)
