"""What a user sees in TensorBoard, through a real TensorBoard server on 127.0.0.1 started with exactly the flags
the README prints, on the logs of a short real fit with ``ExplanationMonitor``: every image tag serves every step it
was logged at (the Images tab and Time Series), the explanations sit at the explained steps (one overlay picture
per probe; the per-probe timelines at the events where their columns change), the ``xai/`` scalars share the step
axis of Lightning's own ``val_loss``, carry their descriptions, and the Custom Scalars tab groups them per method.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from readme_commands import tensorboard_command, with_logdir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_xai import render
from lightning_xai.callbacks import ExplanationMonitor, descriptions
from lightning_xai.demos import MEAN, STD, SyntheticDataModule, ViTClassifier

pytestmark = pytest.mark.slow

EPOCHS = 11  # 12 explained steps with the baseline: more than the 10 images per tag TensorBoard keeps by default
STARTUP_SECONDS = 90  # the server's first load of the logs; it normally takes a few seconds


@pytest.fixture(scope="module")
def fit_logs(tmp_path_factory) -> Path:
    """Logs of a short real fit: 11 epochs of 2 steps each, explained before training and after each epoch."""
    root = tmp_path_factory.mktemp("tensorboard_logs")
    pl.seed_everything(0, workers=True)
    data = SyntheticDataModule(family="texture", num_classes=4, image_size=32, num_train=32, num_val=16,
                               batch_size=16, seed=0, val_return_mask=True)
    model = ViTClassifier(num_classes=4, image_size=32, lr=2e-3, class_names=list(data.classes), patch_size=8,
                          embed_dim=32, depth=2, num_heads=2)
    monitor = ExplanationMonitor(methods=["gradtoken"], num_probes=2, explain_at_fit_start=True,
                                 class_names=data.classes, mean=MEAN, std=STD)
    trainer = pl.Trainer(max_epochs=EPOCHS, logger=TensorBoardLogger(str(root), name="fit"), callbacks=[monitor],
                         accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, datamodule=data)
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A TensorBoard process on 127.0.0.1 and a small JSON client for its HTTP API."""

    def __init__(self, command: list[str], log_file: Path) -> None:
        self.port = free_port()
        arguments = [*command[1:], "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_file = log_file
        with log_file.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", *arguments],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def get(self, path: str, **query: str):
        url = f"http://127.0.0.1:{self.port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=20) as response:
            return json.loads(response.read())

    def post(self, path: str, **form: str):
        body = urllib.parse.urlencode(form).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", data=body, timeout=20) as response:
            return json.loads(response.read())

    def wait_for(self, ready, what: str, seconds: float = STARTUP_SECONDS):
        """Poll ``ready()`` (which may raise while the server starts) until it returns something truthy."""
        deadline, last_error = time.monotonic() + seconds, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"tensorboard exited with {self.process.returncode}:\n{self.log_file.read_text()}")
            try:
                value = ready()
                if value:
                    return value
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as err:
                last_error = err
            time.sleep(0.5)
        raise AssertionError(f"tensorboard did not serve {what} within {seconds} s (last error: {last_error}); "
                             f"its output:\n{self.log_file.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def logged_steps(run_dir: Path) -> dict[str, list[int]]:
    """Per image tag, the steps the event files hold (read directly, keeping every image)."""
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: sorted({event.step for event in events.Images(tag)}) for tag in events.Tags()["images"]}


@pytest.fixture(scope="module")
def server(fit_logs, tmp_path_factory):
    command = with_logdir(tensorboard_command(), fit_logs)
    assert command[0] == "tensorboard"
    running = Server(command, tmp_path_factory.mktemp("tensorboard_server") / "tensorboard.log")
    try:
        yield running
    finally:
        running.stop()
    assert running.process.returncode is not None


def explanation_image_tags(tags) -> list[str]:
    """The per-step explanation images (the probe images alone are logged once, at the first step)."""
    return sorted(tag for tag in tags if tag.startswith("xai/") and not tag.startswith("xai/probes/"))


def test_every_image_tag_serves_every_logged_step(server, fit_logs):
    run_dir = next(fit_logs.rglob("events.out.tfevents.*")).parent
    run = run_dir.relative_to(fit_logs).as_posix()
    expected = logged_steps(run_dir)
    assert explanation_image_tags(expected), f"no explanation images were logged: {sorted(expected)}"
    tags = server.wait_for(lambda: server.get("/data/plugin/images/tags").get(run), f"the image tags of {run}")
    assert sorted(tags) == sorted(expected)

    def served(tag: str) -> list[int]:
        return [image["step"] for image in server.get("/data/plugin/images/images", run=run, tag=tag)]

    for tag, steps in expected.items():  # the Images tab
        server.wait_for(lambda tag=tag, steps=steps: served(tag) == steps, f"all {len(steps)} steps of {tag}")
    requests = [{"plugin": "images", "tag": tag, "run": run, "sample": 0} for tag in expected]  # Time Series
    for answer in server.post("/data/plugin/timeseries/timeSeries", requests=json.dumps(requests)):
        steps = [point["step"] for point in answer["runToSeries"][run]]
        assert steps == expected[answer["tag"]], f"Time Series serves {answer['tag']} at {steps}"


def test_explanations_and_xai_scalars_share_the_step_axis_of_val_loss(server, fit_logs):
    run_dir = next(fit_logs.rglob("events.out.tfevents.*")).parent
    run = run_dir.relative_to(fit_logs).as_posix()

    def scalar_tags():
        tags = server.get("/data/plugin/scalars/tags").get(run, {})
        return tags if "val_loss" in tags and any(tag.startswith("xai/") for tag in tags) else None

    tags = server.wait_for(scalar_tags, f"the scalars of {run}")
    val_steps = [step for _, step, _ in server.get("/data/plugin/scalars/scalars", run=run, tag="val_loss")]
    assert len(val_steps) == EPOCHS and val_steps[-1] > EPOCHS, f"val_loss is not logged per global step: {val_steps}"
    explained = [0, *val_steps]  # the fit-start baseline is the first point, global step 0

    xai_scalars = sorted(tag for tag in tags if tag.startswith("xai/"))
    assert not [tag for tag in xai_scalars if tag.startswith("xai/init/")], "the baseline has its own tags"
    for tag in xai_scalars:
        steps = [step for _, step, _ in server.get("/data/plugin/scalars/scalars", run=run, tag=tag)]
        assert [step for step in steps if step] == val_steps and set(steps) <= set(explained), (tag, steps)
    assert "xai/target_probability" in xai_scalars
    first = server.get("/data/plugin/scalars/scalars", run=run, tag="xai/target_probability")
    assert [step for _, step, _ in first] == explained

    image_tags = explanation_image_tags(server.get("/data/plugin/images/tags")[run])
    assert image_tags and not [tag for tag in image_tags if tag.endswith("_init")], image_tags
    assert {"xai/gradtoken/overlay/0", "xai/gradtoken/overlay/1"} <= set(image_tags)  # one per probe
    assert "xai/gradtoken/overlay" not in image_tags
    # the per-probe timelines change (and are logged) only when a new column joins them: 12 events, 8 columns
    changed = [step for count, step in enumerate(explained, 1)
               if render.stride_columns(count, 8) != render.stride_columns(max(1, count - 1), 8) or count == 1]
    assert len(changed) == 10
    for tag in image_tags:
        steps = [image["step"] for image in server.get("/data/plugin/images/images", run=run, tag=tag)]
        expected = changed if "/timeline/" in tag else explained
        assert steps == expected, f"{tag} is served at steps {steps}, expected {expected}"


def test_scalars_carry_their_descriptions_and_the_custom_scalars_layout_groups_them(server, fit_logs):
    run_dir = next(fit_logs.rglob("events.out.tfevents.*")).parent
    run = run_dir.relative_to(fit_logs).as_posix()

    def xai_tags():
        tags = server.get("/data/plugin/scalars/tags").get(run, {})
        return tags if "xai/gradtoken/similarity_prev" in tags else None

    tags = server.wait_for(xai_tags, f"the xai scalars of {run}")
    ours = {tag: info for tag, info in tags.items() if tag.startswith("xai/")}
    assert ours and {"xai/gradtoken/entropy", "xai/target_probability", "xai/probe_accuracy"} <= set(ours)
    for tag, info in ours.items():  # the description TensorBoard shows beside the chart, rendered as HTML
        title = descriptions.describe(tag).title
        assert f"<strong>{title}</strong>" in info["description"], (tag, info)
    assert not tags["val_loss"]["description"]  # Lightning's own scalars are left as they are

    layout = server.wait_for(lambda: server.get("/data/plugin/custom_scalars/layout"), "the Custom Scalars layout")
    categories = {category["title"]: category["chart"] for category in layout["category"]}
    assert list(categories) == ["xai", "xai/gradtoken"]
    charted = set()
    for charts in categories.values():
        for chart in charts:
            regex = chart["multiline"]["tag"][0]
            matched = [tag for tag in ours if re.fullmatch(regex, tag)]
            assert matched, f"chart {chart['title']!r} ({regex}) matches no logged tag"
            charted.update(matched)
    assert charted == set(ours)  # every xai scalar has its chart
    entropy = next(chart for chart in categories["xai/gradtoken"] if chart["title"].startswith("gradtoken/entropy"))
    served = server.get("/data/plugin/custom_scalars/scalars", run=run, tag=entropy["multiline"]["tag"][0])
    steps = [step for _, step, _ in served["tag_to_events"]["xai/gradtoken/entropy"]]
    assert steps[0] == 0 and len(steps) == EPOCHS + 1  # the chart draws every explained step
