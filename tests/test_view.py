"""What a user sees (issue 21, issue 19 item 10), read back from real event files and real W&B run files: one
overlay picture per probe, the true and predicted class on each probe with wrong rows framed, each scalar's
description, one Custom Scalars layout per run (also after a resume), per-probe timelines re-logged only when they
change, overlay grids paged."""

from __future__ import annotations

import glob
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import wandb_history, wandb_records
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_xai import render
from lightning_xai.callbacks import ExplanationMonitor, descriptions
from lightning_xai.callbacks.presentation import PAGE_PROBES, Board
from lightning_xai.demos import MEAN, STD, SyntheticDataModule, ViTClassifier
from lightning_xai.explainers import Explanation

TINY = dict(num_classes=4, image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def data() -> SyntheticDataModule:
    return SyntheticDataModule(family="texture", num_classes=4, image_size=32, num_train=32, num_val=16,
                               batch_size=16, seed=0, val_return_mask=True)


def fit(root: Path, logger, epochs: int, ckpt_path: str | None = None, **options) -> ExplanationMonitor:
    pl.seed_everything(0, workers=True)
    module = data()
    monitor = ExplanationMonitor(methods=["gradtoken"], num_probes=options.pop("num_probes", 2),
                                 explain_at_fit_start=True, class_names=module.classes, mean=MEAN, std=STD, **options)
    checkpoint = ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_top_k=0)
    trainer = pl.Trainer(max_epochs=epochs, logger=logger, callbacks=[monitor, checkpoint], accelerator="cpu",
                         devices=1, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         num_sanity_val_steps=0, default_root_dir=str(root))
    trainer.fit(ViTClassifier(class_names=list(module.classes), **TINY), datamodule=module, ckpt_path=ckpt_path)
    return monitor


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """A TensorBoard run of 10 epochs (11 explanation events), stopped after 9 and resumed into the same version
    folder: two event files."""
    root = tmp_path_factory.mktemp("view")
    fit(root, TensorBoardLogger(str(root), name="run", version=0), epochs=9)
    last = str(root / "ckpt" / "last.ckpt")
    fit(root, TensorBoardLogger(str(root), name="run", version=0), epochs=10, ckpt_path=last)
    return root / "run" / "version_0"


def summaries(run_dir: Path) -> list[tuple[Path, Event]]:
    """Every event of every event file of ``run_dir``, with its file."""
    return [(path, event) for path in sorted(run_dir.glob("events.out.tfevents.*"))
            for event in EventFileLoader(str(path)).Load()]


def test_tensorboard_logs_one_overlay_picture_per_probe(resumed_run):
    events = EventAccumulator(str(resumed_run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert "xai/gradtoken/overlay" not in tags and {"xai/gradtoken/overlay/0", "xai/gradtoken/overlay/1"} <= set(tags)
    explained = [e.step for e in events.Scalars("xai/target_probability")]
    assert len(explained) == 11
    for probe in range(2):
        overlays = events.Images(f"xai/gradtoken/overlay/{probe}")
        assert [e.step for e in overlays] == explained
        # probe + 1 overlay of 96 px side by side under a three-line caption: wider than tall, as the cards are
        assert (overlays[-1].width, overlays[-1].height) == (2 * 98 + 2, render.band_height(3) + 96 + 4)


def test_probe_timelines_are_relogged_only_when_their_columns_change(resumed_run):
    events = EventAccumulator(str(resumed_run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    explained = [e.step for e in events.Scalars("xai/target_probability")]
    changed = [explained[i] for i in range(11)
               if i == 0 or render.stride_columns(i + 1, 8) != render.stride_columns(i, 8)]
    assert len(changed) == 10 < len(explained)  # 11 events: events 10 (9 columns: the stride doubles) and 11 added one
    for probe in range(2):
        assert [e.step for e in events.Images(f"xai/gradtoken/timeline/{probe}")] == changed


def test_every_scalar_has_its_description_once_per_tag_and_file(resumed_run):
    described: dict[tuple[Path, str], int] = {}
    tags = set()
    for path, event in summaries(resumed_run):
        for value in event.summary.value:
            if value.tag.startswith("xai/") and value.metadata.plugin_data.plugin_name == "scalars":
                tags.add(value.tag)
                if value.metadata.summary_description:
                    assert value.metadata.summary_description == descriptions.description(value.tag)
                    described[path, value.tag] = described.get((path, value.tag), 0) + 1
    assert {"xai/gradtoken/entropy", "xai/gradtoken/similarity_prev", "xai/probe_accuracy"} <= tags
    files = {path for path, _ in described}
    assert len(files) == 2  # the resumed fit writes its own event file, with the descriptions again
    assert set(described.values()) == {1} and {tag for _, tag in described} == tags


def test_custom_scalars_layout_once_per_fit_grouped_per_method(resumed_run):
    layouts = [(path, value) for path, event in summaries(resumed_run) for value in event.summary.value
               if value.tag == "custom_scalars__config__"]
    assert len(layouts) == 2 and len({path for path, _ in layouts}) == 2  # once per fit, the resume included
    layout = layout_pb2.Layout()
    layout.ParseFromString(layouts[-1][1].tensor.string_val[0])
    categories = {category.title: category for category in layout.category}
    assert list(categories) == ["xai", "xai/gradtoken"]
    charts = {chart.title: list(chart.multiline.tag) for chart in categories["xai/gradtoken"].chart}
    assert charts["gradtoken/entropy: entropy (spread of the map)"] == [r"^(xai/gradtoken/entropy)$"]
    assert "gradtoken/similarity_prev: similarity to the previous event" in charts


def test_layout_draws_the_shortcut_rate_and_its_threshold_in_one_chart():
    tags = ["xai/probe_accuracy", "xai/m/entropy", "xai/m/shortcut_rate", "xai/m/shortcut_threshold", "val_loss"]
    layout = descriptions.scalar_layout(tags)
    assert list(layout) == ["xai", "xai/m"]
    assert layout["xai/m"]["m/shortcut_rate: shortcut rate vs threshold"] == [
        "Multiline", [r"^(xai/m/shortcut_rate|xai/m/shortcut_threshold)$"]]
    assert not [chart for chart in layout["xai/m"] if "shortcut_threshold:" in chart]  # not drawn twice
    assert all(descriptions.describe(f"xai/m/{name}") for name in descriptions.SCALARS)
    assert descriptions.describe("val_loss") is None


def board_rows(labels, predictions, targets=((0,), (1,))):
    board = Board(class_names=["a", "b"], mean=(0.5,) * 3, std=(0.5,) * 3)
    images = torch.zeros(2, 3, 32, 32)
    result = Explanation(method="gradtoken", maps=torch.rand(2, 1, 32, 32), raw=torch.rand(2, 1, 32, 32),
                         targets=torch.tensor(targets), probs=torch.tensor([[0.9], [0.6]]))
    tiles = board.overlays(images, result.maps)
    return board.probe_rows(images, result, tiles, "ep 1", labels, predictions)


def test_probe_captions_show_true_and_predicted_class_and_wrong_rows_are_marked():
    rows = board_rows(torch.tensor([0, 0]), torch.tensor([0, 1]))  # probe 1 is predicted 'b', its label is 'a'
    band = render.band_height(3)
    texts = ["#0 ep 1\ntrue a", "#1 ep 1\ntrue a"]  # probe 1's overlay names its prediction, 'b'
    blank = np.zeros((2, 96, 96, 3), np.uint8)
    expected = render.caption(blank, texts, lines=3, backgrounds=[None, render.WRONG_BAND])[:, :band]
    np.testing.assert_array_equal(rows[:, 0, :band], expected)  # the wrong row's captions are red
    assert (rows[1, 1, :band] == expected[1]).all(axis=-1).mean() > 0.8  # its overlay's caption too
    red = np.array(render.WRONG_COLOUR, np.uint8)
    pictures = rows[:, :, band:]
    for edge in (pictures[1, :, :2], pictures[1, :, -2:], pictures[1, :, :, :2], pictures[1, :, :, -2:]):
        assert (edge == red).all()  # a frame round every picture of the wrong row
    assert not (pictures[0] == red).all(axis=-1).any()
    explained_label = board_rows(torch.tensor([0, 1]), torch.tensor([0, 0]), targets=[[0], [1]])
    expected = render.caption(blank[:1], ["#1 ep 1\ntrue b\npred a"], lines=3, backgrounds=[render.WRONG_BAND])
    np.testing.assert_array_equal(explained_label[1, 0, :band], expected[0, :band])  # no overlay names 'a'
    unlabelled = board_rows(None, None)
    assert unlabelled.shape[2] == render.band_height(2) + 96  # two caption lines without labels, as before


def test_board_draws_only_the_pictures_asked_for_and_every_sink_names_what_it_reads():
    from lightning_xai.callbacks.presentation import PICTURE_KINDS
    from lightning_xai.callbacks.sinks import PngSink, RawMapSink, Sink, TensorBoardSink, WandbSink

    images = torch.rand(2, 3, 32, 32)
    result = Explanation(method="m", maps=torch.rand(2, 1, 32, 32), raw=torch.rand(2, 1, 32, 32),
                         targets=torch.tensor([[0], [1]]), probs=torch.tensor([[0.9], [0.6]]))

    def draw(board, label, **kw):
        return board.draw(images, label, result.targets, result.probs, {"m": result}, **kw)

    full, tensorboard = Board(), Board()
    everything = [draw(full, f"ep {i}") for i in range(2)]
    only = [draw(tensorboard, f"ep {i}", kinds={"probe_overlays", "probe_timelines"}) for i in range(2)]
    for all_kinds, some in zip(everything, only, strict=True):
        assert not some.grids and not some.timelines and not some.rows
        np.testing.assert_array_equal(some.probe_overlays["m"], all_kinds.probe_overlays["m"])
        np.testing.assert_array_equal(some.probe_timelines["m"], all_kinds.probe_timelines["m"])
    np.testing.assert_array_equal(tensorboard.timeline("m"), full.timeline("m"))  # the history is kept anyway
    nothing = draw(Board(), "ep 0", kinds=())
    assert not (nothing.grids or nothing.probe_overlays or nothing.timelines or nothing.probe_timelines or nothing.rows)
    with pytest.raises(ValueError, match="unknown picture kinds.*'grid'"):
        draw(Board(), "ep 0", kinds={"grid"})
    read = {TensorBoardSink: ("probe_overlays", "probe_timelines"), WandbSink: ("grids", "timelines", "rows"),
            PngSink: ("grids", "timelines"), RawMapSink: ()}
    for sink, kinds in read.items():
        assert sink.pictures == frozenset(kinds) and sink.pictures <= PICTURE_KINDS
    assert Sink.pictures == frozenset()


def test_overlay_grid_pages_hold_at_most_page_probes():
    board = Board()
    rows = np.zeros((PAGE_PROBES * 2 + 3, 2, 20, 10, 3), np.uint8)
    pages = board.grid_pages(rows)
    assert [page.shape[0] for page in pages] == [16 * 22 + 2] * 2 + [3 * 22 + 2]


def test_wandb_table_has_the_label_and_the_config_the_descriptions(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import json

    import wandb

    fit(tmp_path, WandbLogger(project="lightning-xai-test", save_dir=str(tmp_path), offline=True), epochs=1)
    wandb.finish()
    run = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))[0]
    table = json.loads(sorted((Path(run) / "files").rglob("*.table.json"))[-1].read_text())
    assert table["columns"][:7] == ["epoch", "step", "probe", "target", "target_name", "probability", "label"]
    assert {row[6] for row in table["data"]} <= set(data().classes)
    configs = {}
    wandb_history(run)  # waits until W&B's service has written the whole run file
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "config":
            configs.update({item.key: json.loads(item.value_json) for item in record.config.update})
    described = configs[descriptions.CONFIG_KEY]
    described = described.get("value", described)
    assert described["xai/gradtoken/entropy"] == descriptions.description("xai/gradtoken/entropy")
    assert described["xai/gradtoken/similarity_prev"].startswith("**similarity to the previous event**")


def test_png_sink_writes_one_file_per_grid_page(tmp_path):
    from lightning_xai.callbacks.sinks import PngSink, Record

    pages = [np.full((10, 12, 3), value, np.uint8) for value in (0, 100)]
    PngSink(tmp_path).write(Record(epoch=3, step=40, label="ep 3", stem="epoch_0003", grids={"gradtoken": pages}))
    written = sorted(p.name for p in (tmp_path / "xai" / "gradtoken").glob("*.png"))
    assert written == ["epoch_0003.png", "epoch_0003_page_2.png"]


def test_a_named_monitors_layout_points_at_its_own_tags():
    """A monitor with ``name=`` logs ``xai/<name>/<method>/<scalar>``: its Custom Scalars charts must select those
    tags (an unprefixed regex would draw empty charts)."""
    layout = descriptions.scalar_layout(["xai/gradtoken/entropy", "xai/target_probability"], "val")
    assert list(layout) == ["xai/val", "xai/val/gradtoken"]
    charts = list(layout["xai/val/gradtoken"].values())
    assert charts[0] == ["Multiline", [r"^(xai/val/gradtoken/entropy)$"]]
    assert all(tag.startswith("^(xai/val/gradtoken/") for _, (tag,) in charts)
