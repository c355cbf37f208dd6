"""Shared fixtures: tiny random timm ViTs for geometry and state tests, and a small ViT trained once per
session on generated texture-family data (weights cached in the session's temporary directory)."""

from __future__ import annotations

import os

import pytest
import timm
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def make_vit(
    img_size=(32, 32), patch_size=8, num_classes=5, depth=3, embed_dim=48, num_heads=3, seed=0, **kwargs
) -> torch.nn.Module:
    """A tiny random timm VisionTransformer (no download) in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        **kwargs,
    )
    return model.eval()


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_vit()


def run_two_processes(script: str, folder, name: str, timeout: float = 300):
    """Write ``script`` (formatted with ``tests`` = this folder and ``out`` = ``folder``) to ``folder/name`` and
    run it with torch.distributed on gloo (for 2 CPU processes); returns the ``CompletedProcess`` (text output).
    The script imports ``lightning_xai`` from this checkout (first on ``PYTHONPATH``), not from whichever copy the
    environment has installed: it runs in ``folder``, where the test session's own path does not reach.

    Raises:
        subprocess.TimeoutExpired: it ran past ``timeout`` seconds (a hang between the ranks).
    """
    import subprocess
    import sys
    from pathlib import Path

    path = Path(folder) / name
    path.write_text(script.format(tests=str(Path(__file__).parent), out=str(folder)))
    checkout = str(Path(__file__).resolve().parents[1])
    paths = [checkout, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PL_TORCH_DISTRIBUTED_BACKEND": "gloo", "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, str(path)], cwd=folder, env=env, timeout=timeout, capture_output=True,
                          text=True)


@pytest.fixture
def registered():
    """``registered(cls)`` registers an explainer class for this test only (unregistered afterwards, so no test
    sees another's methods)."""
    from lightning_xai.explainers import register, unregister

    names: list[str] = []

    def add(cls):
        names.append(register(cls).name)
        return cls

    yield add
    for name in names:
        unregister(name)


def trained_architecture() -> dict:
    """The examples' small ViT (``lightning_xai.demos.SMALL_VIT``) at 32 px."""
    from lightning_xai.demos import SMALL_VIT

    return dict(model_name="vit_tiny_patch16_224", image_size=32, **SMALL_VIT)


def train_classifier(family: str, root, epochs: int = 12, num_classes: int = 4, seed: int = 0):
    """Train the small test ViT on generated ``family`` images with a real Trainer; weights cached in ``root``."""
    import lightning.pytorch as pl

    from lightning_xai.demos import SyntheticDataModule, ViTClassifier

    pl.seed_everything(seed, workers=True)
    data = SyntheticDataModule(family=family, num_classes=num_classes, image_size=32, num_train=3072, num_val=256,
                               batch_size=64, seed=seed, val_return_mask=True)
    module = ViTClassifier(num_classes=num_classes, lr=2e-3, warmup_epochs=1, **trained_architecture())
    cached = root / f"{family}.pt"
    if cached.exists():
        module.load_state_dict(torch.load(cached))
    else:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             default_root_dir=str(root))
        trainer.fit(module, datamodule=data)
        torch.save(module.state_dict(), cached)
    data.setup("fit")
    return module.eval(), data


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory):
    return tmp_path_factory.mktemp("trained")


@pytest.fixture(scope="session")
def texture_model(trained_root):
    """A small ViT trained in this session on the texture family, with its data module."""
    return train_classifier("texture", trained_root)


def wandb_records(run_dir) -> list:
    """Every protobuf ``Record`` of an offline W&B run file ``run-*.wandb``, as written so far (7-byte header,
    32 KiB blocks, records in FULL/FIRST/MIDDLE/LAST chunks)."""
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    data = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    block, offset, pending, records = 32768, 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir, timeout: float = 60.0) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``run-*.wandb`` file (W&B's LevelDB-style log of
    protobuf ``Record``s: 7-byte file header, 32 KiB blocks, records split into FULL/FIRST/MIDDLE/LAST chunks).
    ``wandb.finish()`` may return before W&B's service has written the whole file: this waits (up to
    ``timeout`` seconds) for the run's ``exit`` record. Media values come flattened:
    ``row["xai/m/overlay/_type"] == "image-file"``."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_dir)
        finished = any(r.WhichOneof("record_type") == "exit" for r in records)
        if finished or time.monotonic() > deadline:
            return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                    for r in records if r.WhichOneof("record_type") == "history"]
        time.sleep(0.5)
