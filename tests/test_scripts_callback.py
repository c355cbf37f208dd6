"""Issue 19, the callback side, with real Trainers, real tiny timm ViTs and real TensorBoard event files: the
module's batch hooks and preprocessing inside the step, one-logit binary and multi-label heads, named monitors,
schedules that never explain, and the smaller options."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai.callbacks import C2FMonitor, ExplanationMonitor
from lightning_xai.demos import SyntheticDataModule, ViTClassifier

TINY = dict(model_name="vit_tiny_patch16_224", num_classes=4, image_size=32, patch_size=8, embed_dim=48, depth=2,
            num_heads=3)
QUICK = dict(limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
MEAN, STD = 0.5, 0.25


def trainer(tmp_path: Path, callbacks=(), logger=False, epochs=1, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), deterministic=True)
    options.update(kwargs)
    return pl.Trainer(**options)


def shapes_data(**kwargs) -> SyntheticDataModule:
    options = dict(family="shape", num_classes=4, image_size=32, num_train=64, num_val=32, batch_size=16, seed=0)
    return SyntheticDataModule(**{**options, **kwargs})


def quadrant_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` in [0, 1] with a bright square in some quadrants, and their multi-hot quadrant
    labels ``(N, 4)`` float (about half the quadrants lit: many rows have two or more positives)."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(count, 4, generator=generator) < 0.5).float()
    images = 0.2 * torch.rand(count, 3, 32, 32, generator=generator)
    for q, (top, left) in enumerate(((0, 0), (0, 16), (16, 0), (16, 16))):
        lit = labels[:, q].bool()
        images[lit, :, top + 4 : top + 12, left + 4 : left + 12] += 0.8
    return images, labels


def loaders(labels_of, count=64, batch_size=16) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders of quadrant images with ``labels_of(multi_hot)`` as labels."""
    parts = []
    for seed, n in ((0, count), (1, count // 2)):
        images, multi_hot = quadrant_images(n, seed)
        parts.append(DataLoader(TensorDataset(images, labels_of(multi_hot)), batch_size=batch_size))
    return parts[0], parts[1]


class Head(pl.LightningModule):
    """A tiny timm ViT with ``outputs`` logits: BCE on a one-logit or a multi-hot target, or cross-entropy
    (``multiclass``); ``normalise`` in ``"after_transfer"`` (on_after_batch_transfer) or ``"step"`` (inside the
    steps, before the model), or nowhere."""

    def __init__(self, outputs: int, multiclass: bool = False, normalise: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=outputs, img_size=32,
                                     patch_size=8, embed_dim=48, depth=2, num_heads=3)
        self.multiclass, self.normalise = multiclass, normalise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.normalise == "after_transfer":  # a GPU pipeline: augment while training, normalise always
            x, y = batch
            x = x.flip(-1) if self.trainer.training else x
            return (x - MEAN) / STD, y
        return batch

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        if self.normalise == "step":
            x = (x - MEAN) / STD
        z = self(x)
        if self.multiclass:
            return F.cross_entropy(z, y)
        return F.binary_cross_entropy_with_logits(z[:, 0] if z.shape[1] == 1 else z, y.float())

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def scores_of(module: pl.LightningModule, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(images).float()


# -- item 4: the module's batch hooks, and preprocessing inside the step ---------------------------------------
def test_probes_go_through_the_modules_batch_hooks(tmp_path):
    """Normalisation in on_after_batch_transfer reaches the probes (they are what the model sees), and the hooks
    run as in validation (no training augmentation on probes of the val split); no warning."""
    train, val = loaders(lambda y: y[:, 0].long() + 2 * y[:, 1].long())
    module = Head(4, multiclass=True, normalise="after_transfer")
    monitor = ExplanationMonitor("gradtoken", num_probes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [monitor], **{**QUICK, "num_sanity_val_steps": 1}).fit(
            module, train, val)
    raw = torch.stack([val.dataset[i][0] for i in monitor.probe.indices])
    torch.testing.assert_close(monitor.probe.images, (raw - MEAN) / STD)
    assert not [w for w in caught if "validation_step" in str(w.message)]
    assert monitor.explained  # and it explained them


def test_preprocessing_inside_the_step_is_detected_and_batch_transform_fixes_it(tmp_path):
    """Normalising inside validation_step: warned at the first validation batch, naming batch_transform; with a
    batch_transform that normalises, the probes are right and there is no warning."""
    train, val = loaders(lambda y: y[:, 0].long() + 2 * y[:, 1].long())
    monitor = ExplanationMonitor("gradtoken", num_probes=2)
    with pytest.warns(UserWarning, match="changes the images before calling the model.*batch_transform"):
        trainer(tmp_path, [monitor], **QUICK).fit(Head(4, multiclass=True, normalise="step"), train, val)

    fixed = ExplanationMonitor("gradtoken", num_probes=2,
                               batch_transform=lambda batch: ((batch[0] - MEAN) / STD, batch[1], None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [fixed], **QUICK).fit(Head(4, multiclass=True, normalise="step"), train, val)
    assert not [w for w in caught if "changes the images" in str(w.message)]
    raw = torch.stack([val.dataset[i][0] for i in fixed.probe.indices])
    torch.testing.assert_close(fixed.probe.images, (raw - MEAN) / STD)


# -- item 5: one-logit binary heads ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """A one-logit BCE head trained for 3 short epochs, explained for the labels with GradToken and C2F, with the
    display normalisation given as a tensor and a numpy array."""
    tmp = tmp_path_factory.mktemp("binary")
    pl.seed_everything(0)
    train, val = loaders(lambda y: y[:, 0])
    module = Head(1)
    monitor = ExplanationMonitor({"gradtoken": {}, "c2f": {"batch_size": 32}}, num_probes=6, targets="label",
                                 shortcut_alarm=False, deletion_insertion=True, mean=torch.tensor([0.0, 0.0, 0.0]),
                                 std=np.array([1.0, 1.0, 1.0]))
    trainer(tmp, [monitor], epochs=3, limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0).fit(
        module, train, val)
    return module, monitor


def test_binary_head_probabilities_are_sigmoids_of_the_positive_logit(binary_run):
    module, monitor = binary_run
    labels = monitor.probe.labels.long()
    z = scores_of(module, monitor.probe.images)[:, 0]
    assert monitor.runner.task == "binary"
    expected = torch.where(labels == 1, torch.sigmoid(z), 1 - torch.sigmoid(z))
    for method in ("gradtoken", "c2f"):
        result = monitor.last_results[method]
        assert result.targets[:, 0].tolist() == labels.tolist()  # targets="label" on one logit: classes 0 and 1
        torch.testing.assert_close(result.probs[:, 0], expected, atol=1e-5, rtol=1e-4)
    assert monitor.last_scalars["xai/target_probability"] == pytest.approx(float(expected.mean()), abs=1e-5)
    accuracy = float(((z > 0).long() == labels).float().mean())
    assert monitor.last_scalars["xai/probe_accuracy"] == pytest.approx(accuracy)
    assert 0 < monitor.last_scalars["xai/c2f/insertion_auc"] < 1
    c2f = monitor.last_results["c2f"].raw[:, 0].flatten(1)
    assert bool((c2f.std(-1) > 0).all())  # not uniform: the masks' scores differ


def test_binary_gradient_of_the_negative_class_is_the_negated_positive(binary_run):
    """Class 0 of a one-logit head scores -z: GradToken's map for it is computed from the negated gradient."""
    import lightning_xai as lx

    module, monitor = binary_run
    images = monitor.probe.images[:2]
    both = lx.explain(module, images, method="gradtoken", targets=torch.tensor([[0, 1], [0, 1]]))
    torch.testing.assert_close(both.probs.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    single = lx.explain(module, images, method="gradtoken", targets=1, task="binary")
    torch.testing.assert_close(single.raw[:, 0], both.raw[:, 1])


def test_binary_shortcut_check_sees_the_sigmoid_probabilities(binary_run):
    """The shortcut check reads probabilities as a softmax of what the runner predicts: for a one-logit head
    that must be ``[1 - sigmoid(z), sigmoid(z)]`` (a softmax of the scores ``[-z, z]`` would be sigmoid(2z))."""
    import lightning_xai as lx
    from lightning_xai.shortcut.carriers import probabilities_of

    module, monitor = binary_run
    z = scores_of(module, monitor.probe.images)[:, 0]
    probs = monitor.runner.predict(monitor.probe.images).softmax(-1)
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(z), atol=1e-5, rtol=1e-4)
    outcome = monitor.runner.run(lambda name, err: None)  # the event's forward: the check takes its probabilities
    torch.testing.assert_close(monitor.runner.probabilities(outcome),
                               probabilities_of(monitor.runner.predict, outcome.images), rtol=0, atol=0)
    check = lx.check_shortcut(module, monitor.probe.images, method="gradtoken", task="binary")
    assert check.transplant.classes.tolist() == (z > 0).long().tolist()
    with pytest.raises(ValueError, match="multi-label"):
        lx.check_shortcut(module, monitor.probe.images, method="gradtoken", task="multilabel")


def test_one_logit_head_refuses_multiclass_with_the_fix(tmp_path):
    train, val = loaders(lambda y: y[:, 0])
    monitor = ExplanationMonitor("gradtoken", num_probes=2, task="multiclass")
    with pytest.raises(ValueError, match="one logit.*task='binary'"):
        trainer(tmp_path, [monitor], **QUICK).fit(Head(1), train, val)


# -- item 5: multi-label heads, and item 7: two named monitors of one stage ---------------------------------------
@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    """A 4-label sigmoid head trained for 3 short epochs; one monitor explains the labels, one the predictions,
    both on the validation stage with GradToken, told apart by ``name``, logging to TensorBoard."""
    tmp = tmp_path_factory.mktemp("multilabel")
    pl.seed_everything(0)
    train, val = loaders(lambda y: y)
    module = Head(4)
    by_label = ExplanationMonitor("gradtoken", num_probes=6, targets="label", name="label")
    by_pred = ExplanationMonitor("gradtoken", num_probes=6, targets="pred", name="pred")
    logger = TensorBoardLogger(str(tmp), name="run")
    trainer(tmp, [by_label, by_pred], logger=logger, epochs=3, limit_train_batches=4, limit_val_batches=1,
            num_sanity_val_steps=0).fit(module, train, val)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return module, by_label, by_pred, events


def _classes(targets: torch.Tensor) -> list[set[int]]:
    return [set(row) for row in targets.tolist()]


def test_multilabel_explains_every_positive_label_with_sigmoid_probabilities(multilabel_run):
    module, by_label, _, _ = multilabel_run
    labels = by_label.probe.labels
    assert bool((labels.sum(-1) >= 2).any())  # what makes task="auto" multilabel
    assert by_label.runner.task == "multilabel"
    assert by_label.records.shortcut is None  # the alarm needs one class per image: switched off, with a warning
    z = scores_of(module, by_label.probe.images)
    result = by_label.last_results["gradtoken"]
    expected = [set(torch.nonzero(row).flatten().tolist()) or {int(s.argmax())}
                for row, s in zip(labels, z, strict=True)]
    assert _classes(result.targets) == expected
    assert result.targets.shape[1] == max(len(c) for c in expected)  # padded with a repeat of the row's first
    torch.testing.assert_close(result.probs, torch.sigmoid(z).gather(1, result.targets), atol=1e-5, rtol=1e-4)
    right = (z >= 0) == labels.bool()
    assert by_label.last_scalars["xai/probe_exact_match"] == pytest.approx(float(right.all(-1).float().mean()))
    assert by_label.last_scalars["xai/probe_label_accuracy"] == pytest.approx(float(right.float().mean()))
    assert "xai/probe_accuracy" not in by_label.last_scalars  # argmax-vs-argmax means nothing here


def test_multilabel_pred_explains_every_class_over_one_half(multilabel_run):
    module, _, by_pred, _ = multilabel_run
    z = scores_of(module, by_pred.probe.images)
    expected = [set(torch.nonzero(s.sigmoid() >= 0.5).flatten().tolist()) or {int(s.argmax())} for s in z]
    assert _classes(by_pred.last_results["gradtoken"].targets) == expected


def test_explain_with_task_multilabel_scores_with_sigmoids(multilabel_run):
    """lx.explain sees no labels, so a multi-label model is multiclass unless told: task="multilabel" gives the
    sigmoid probabilities (and ViT-CX's mask scores use them: they differ from the softmax run's maps)."""
    import lightning_xai as lx

    module, by_label, _, _ = multilabel_run
    images, targets = by_label.probe.images[:3], torch.tensor([[0, 1], [2, 3], [1, 2]])
    z = scores_of(module, images)
    told = lx.explain(module, images, method="vitcx", targets=targets, task="multilabel", batch_size=32)
    guessed = lx.explain(module, images, method="vitcx", targets=targets, batch_size=32)
    torch.testing.assert_close(told.probs, torch.sigmoid(z).gather(1, targets), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(guessed.probs, z.softmax(-1).gather(1, targets), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(told.raw, guessed.raw)


def test_auto_task_asks_when_the_labels_cannot_tell():
    """0/1 label rows with an empty row and none with two positives: multi-hot or one-hot? task="auto" asks."""
    from lightning_xai.tasks import resolve_task

    unclear = torch.tensor([[0, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="pass task='multilabel' or task='multiclass'"):
        resolve_task("auto", 3, unclear)
    assert resolve_task("multilabel", 3, unclear) == "multilabel"
    assert resolve_task("auto", 3, torch.tensor([[0, 1, 0], [1, 0, 0]])) == "multiclass"  # one-hot
    assert resolve_task("auto", 3, torch.tensor([[0, 1, 1], [0, 0, 0]])) == "multilabel"
    assert resolve_task("auto", 1) == "binary"


def test_two_named_monitors_of_one_stage_write_their_own_tags(multilabel_run):
    _, _, _, events = multilabel_run
    images, scalars = events.Tags()["images"], events.Tags()["scalars"]
    val_steps = [e.step for e in events.Scalars("val_loss")]
    for name in ("label", "pred"):
        assert [e.step for e in events.Images(f"xai/{name}/gradtoken/overlay/0")] == val_steps
        assert f"xai/{name}/probes/0" in images and f"xai/{name}/target_probability" in scalars
    assert not [tag for tag in images + scalars if tag.startswith("xai/gradtoken") or tag == "xai/probes/0"]


# -- item 7: a train-stage and a validation-stage monitor ----------------------------------------------------------
def test_train_and_validation_monitors_named_apart(tmp_path):
    pl.seed_everything(0)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    on_train = ExplanationMonitor("gradtoken", num_probes=2, stage="train", probe_split="train", name="train")
    on_val = ExplanationMonitor("gradtoken", num_probes=2, name="val")
    run = trainer(tmp_path, [on_train, on_val], logger=logger, epochs=2, **QUICK)
    run.fit(ViTClassifier(**TINY), datamodule=shapes_data())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    val_steps = [e.step for e in events.Scalars("val_loss")]
    assert [e.step for e in events.Images("xai/val/gradtoken/overlay/0")] == val_steps == [1, 3]
    assert [e.step for e in events.Images("xai/train/gradtoken/overlay/0")] == [1, 3]  # each epoch's last batch
    assert on_train.state_key != on_val.state_key and "name" in on_val.state_key


def test_two_monitors_that_would_write_the_same_tags_are_refused(tmp_path):
    monitors = [ExplanationMonitor("gradtoken", num_probes=2, stage="train"), ExplanationMonitor("rollout")]
    with pytest.raises(ValueError, match="name=None.*give each its own name="):
        trainer(tmp_path, monitors, **QUICK).fit(ViTClassifier(**TINY), datamodule=shapes_data())


# -- item 8: schedules that never explain ----------------------------------------------------------------------------
@pytest.mark.parametrize(("every", "check", "epochs", "named"), [
    (1, 3, 2, r"check_val_every_n_epoch=3 \(Trainer\) but max_epochs=2"),
    (2, 3, 5, r"every_n_epochs=2 \(monitor\) never meets check_val_every_n_epoch=3"),
])
def test_a_schedule_that_never_explains_is_warned_at_fit_start(tmp_path, every, check, epochs, named):
    monitor = ExplanationMonitor("rollout", num_probes=2, every_n_epochs=every)
    run = trainer(tmp_path, [monitor], epochs=epochs, check_val_every_n_epoch=check, limit_train_batches=1,
                  limit_val_batches=1, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match=named):
        run.fit(ViTClassifier(**TINY), datamodule=shapes_data())
    assert monitor.explained == []  # the warning was right


def test_a_schedule_that_meets_gives_no_warning(tmp_path):
    monitor = ExplanationMonitor("rollout", num_probes=2, every_n_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [monitor], epochs=4, check_val_every_n_epoch=2, limit_train_batches=1, limit_val_batches=1,
                num_sanity_val_steps=0).fit(ViTClassifier(**TINY), datamodule=shapes_data())
    assert not [w for w in caught if "never explain" in str(w.message)]
    assert [epoch for epoch, _ in monitor.explained] == [1, 3]


# -- item 9: the smaller ones ------------------------------------------------------------------------------------------
def test_c2f_monitor_passes_every_c2f_option_to_c2f(tmp_path):
    monitor = C2FMonitor(fusion="contrast", seed=5, noise_sigma=0.2, num_probes=2, batch_size=32)
    trainer(tmp_path, [monitor], **QUICK).fit(ViTClassifier(**TINY), datamodule=shapes_data())
    options = monitor.last_results["c2f"].options
    assert (options["fusion"], options["seed"], options["noise_sigma"]) == ("contrast", 5, 0.2)
    assert monitor.probes.seed == 5


def test_options_of_the_wrong_kind_are_refused():
    with pytest.raises(ValueError, match="std must be positive"):
        ExplanationMonitor(mean=[0.5], std=[0.0])
    with pytest.raises(ValueError, match="save_raw must be True or False, got 'false'"):
        ExplanationMonitor(save_raw="false")
    with pytest.raises(ValueError, match="explain_at_fit_start must be True or False"):
        ExplanationMonitor(explain_at_fit_start=1)
    monitor = ExplanationMonitor(mean=torch.tensor([0.5, 0.4, 0.3]), std=np.array([0.2, 0.2, 0.2]))
    assert monitor.records.board.mean == pytest.approx([0.5, 0.4, 0.3])


def test_batch_transform_returning_two_items_gets_a_clear_error(tmp_path):
    monitor = ExplanationMonitor("rollout", num_probes=2, batch_transform=lambda batch: (batch[0], batch[1]))
    with pytest.raises(ValueError, match=r"must return \(images, labels, masks\), three items.*got 2 items"):
        trainer(tmp_path, [monitor], **QUICK).fit(ViTClassifier(**TINY), datamodule=shapes_data())


def test_class_names_of_the_wrong_length_are_refused_at_setup(tmp_path):
    monitor = ExplanationMonitor("rollout", num_probes=2, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="class_names has 3 names but the model has 4 classes"):
        trainer(tmp_path, [monitor], **QUICK).fit(ViTClassifier(**TINY), datamodule=shapes_data())


def test_hugging_face_id2label_names_the_classes(tmp_path):
    import transformers
    from family_models import PixelValues, hf_config

    class HFModule(Head):
        def __init__(self) -> None:
            super().__init__(4, multiclass=True)
            config = hf_config(id2label={0: "cat", 1: "dog", 2: "fox", 3: "owl"})
            self.vit = PixelValues(transformers.ViTForImageClassification(config))

    monitor = ExplanationMonitor("rollout", num_probes=2)
    train, val = loaders(lambda y: y[:, 0].long() + 2 * y[:, 1].long())
    trainer(tmp_path, [monitor], **QUICK).fit(HFModule(), train, val)
    board = monitor.records.board
    assert [board.class_name(i) for i in range(4)] == ["cat", "dog", "fox", "owl"]


def test_fast_dev_run_writes_nothing(tmp_path):
    monitor = ExplanationMonitor("rollout", num_probes=2)
    trainer(tmp_path, [monitor], fast_dev_run=True).fit(ViTClassifier(**TINY), datamodule=shapes_data())
    assert monitor.last_results  # it explained (the point of a fast_dev_run) ...
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("metrics.csv"))  # ... and wrote nothing


def test_repeated_validate_calls_get_their_own_label_and_file(tmp_path):
    monitor = ExplanationMonitor("rollout", num_probes=2)
    run = trainer(tmp_path, [monitor], **QUICK)
    module, data = ViTClassifier(**TINY), shapes_data()
    run.fit(module, datamodule=data)
    run.validate(module, datamodule=data, verbose=False)
    run.validate(module, datamodule=data, verbose=False)
    files = sorted(p.name for p in (tmp_path / "xai" / "rollout").glob("*.png") if p.name != "timeline.png")
    assert files == ["epoch_0000.png", "validate_0001.png", "validate_0002.png"]  # no "epoch_0001": it never ran
