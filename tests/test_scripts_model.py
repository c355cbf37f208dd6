"""Issue 19, the model side, with real tiny timm ViTs and real Trainers: modules that change their input before the
ViT, a compiled LightningModule, gradient checkpointing, ``vit=`` naming a ViT the forward never runs, and the
smaller ``lx.explain`` cases."""

from __future__ import annotations

import collections
import os
import shutil
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_vit
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_callback_cases import Steps, WithEMA, loaders
from test_callbacks import TINY, datamodule, trainer
from torch import nn

import lightning_xai as lx
from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.callbacks.probes import ProbeSet
from lightning_xai.callbacks.runner import ProbeRunner
from lightning_xai.demos import ViTClassifier
from lightning_xai.explainers.base import upsample
from lightning_xai.explainers.gradient import NoPositiveRelevanceWarning

GRADIENT_METHODS = ("gradtoken", "gae")


class Before(pl.LightningModule):
    """A classifier that changes its input before a tiny timm ViT: ``forward(x) = vit(prep(x))``."""

    def __init__(self, prep: nn.Module, vit: nn.Module):
        super().__init__()
        self.prep, self.vit = prep, vit

    def forward(self, images):
        return self.vit(self.prep(images))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Repeat(nn.Module):
    """Grayscale to RGB as users write it: ``x.repeat(1, 3, 1, 1)``."""

    def forward(self, x):
        return x.repeat(1, 3, 1, 1)


class Resize(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for param in module.parameters():
        nn.init.normal_(param, std=0.3)
    return module


# (prep, ViT kwargs for make_vit, the user's image shape): 1 channel repeated or 1x1-convolved to 3; a resize from
# a non-square 56x40 to the ViT's 32x32; a conv stem that halves 64 px into 64 channels (not an image)
VARIANTS = {
    "repeat": (lambda: Repeat(), {}, (1, 32, 32)),
    "conv1x1": (lambda: seeded(nn.Conv2d(1, 3, 1)), {}, (1, 32, 32)),
    "resize": (lambda: Resize((32, 32)), {}, (3, 56, 40)),
    "stem": (lambda: seeded(nn.Conv2d(3, 64, 3, stride=2, padding=1)), dict(in_chans=64), (3, 64, 64)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inputs_changed_before_the_vit_are_explained_on_the_users_images(variant):
    """Maps have the user's image size and are the maps of the same ViT fed the changed input directly, with its
    patch grid upsampled onto the user's image."""
    make_prep, vit_kwargs, shape = VARIANTS[variant]
    vit = make_vit(depth=2, **vit_kwargs)
    module = Before(make_prep(), vit).eval()
    images = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fed = module.prep(images)
    for method in GRADIENT_METHODS:
        result = lx.explain(module, images, method=method, targets=[1, 2])
        direct = lx.explain(vit, fed, method=method, targets=[1, 2])
        assert result.maps.shape == (2, 1, *shape[-2:])
        assert result.patch_maps.shape == direct.patch_maps.shape == (2, 1, 4, 4)
        torch.testing.assert_close(result.patch_maps, direct.patch_maps, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.raw, upsample(direct.patch_maps, shape[-2:]), rtol=1e-5, atol=1e-6)
    for method in ("c2f", "rollout"):  # masks are drawn on the user's images; rollout reads the grid
        result = lx.explain(module, images, method=method)
        assert result.maps.shape == (2, 1, *shape[-2:]) and bool(torch.isfinite(result.raw).all())


def test_timm_hybrid_vit_is_explained_on_its_input_image():
    """timm's hybrid ViT: the ResNet stem inside the patch embedding downsamples before the patch projection (whose
    patch size, 8, would give a 16x16 grid at 128 px): the grid is read from the tokens the blocks receive."""
    torch.manual_seed(0)
    hybrid = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=128, depth=2, num_classes=3)
    hybrid.eval()
    assert hybrid.patch_embed.proj.in_channels == 64  # what the old check compared the images' 3 channels with
    images = torch.randn(2, 3, 128, 128)
    for method in ("gradtoken", "gae", "c2f", "rollout"):
        result = lx.explain(hybrid, images, method=method)
        assert result.maps.shape == (2, 1, 128, 128), method
        assert bool(torch.isfinite(result.raw).all())
    grid = lx.explain(hybrid, images, method="gradtoken").patch_maps.shape[-2:]
    assert tuple(grid) == tuple(hybrid.patch_embed.grid_size) == (4, 4)


def test_a_module_that_rejects_the_images_keeps_its_own_error_with_our_hint():
    module = Before(seeded(nn.Conv2d(1, 3, 1)), make_vit(depth=1)).eval()
    with pytest.raises(RuntimeError, match=r"on the images failed \(shape \(2, 3, 32, 32\)\): pass images as the "
                                           r"module takes them.*The error was RuntimeError: .*channels"):
        lx.explain(module, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"if the images reach the ViT unchanged: images are 40x40 but the ViT was "
                                         r"built for 32x32.*The error was RuntimeError"):
        lx.explain(module, torch.randn(2, 3, 40, 40))


class Gray(torch.utils.data.Dataset):
    """The synthetic images as one-channel medical-style scans."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index][:2]
        return image.mean(0, keepdim=True), label


def test_a_1x1_channel_adapter_trains_and_logs_maps_of_the_gray_images(tmp_path):
    train, val = loaders(Gray)
    pl.seed_everything(0)
    module = Before(nn.Conv2d(1, 3, 1), ViTClassifier(**TINY).model)
    monitor = ExplanationMonitor(methods=["gradtoken", "c2f"], num_probes=2, save_raw=True)
    run = trainer(tmp_path, [monitor], TensorBoardLogger(str(tmp_path), name="gray"), epochs=1,
                  limit_train_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module, train, val)
    assert not [w for w in caught if "explain" in str(w.message).lower() and "failed" in str(w.message)]
    events = EventAccumulator(run.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    for method in ("gradtoken", "c2f"):
        assert len(events.Images(f"xai/{method}/overlay/0")) == 1
    outcome = monitor.runner.run(on_failure=lambda name, err: pytest.fail(f"{name}: {err}"))
    assert outcome.images.shape[1] == 1
    assert {name: tuple(r.maps.shape) for name, r in outcome.results.items()} == {
        "gradtoken": (2, 1, 32, 32), "c2f": (2, 1, 32, 32)}


# -- 2: trainer.fit(torch.compile(model)) ------------------------------------------------------------------------
def fit_compiled(tmp_path, backend, monitor=None, name="compiled"):
    """``trainer.fit(torch.compile(module))`` for 2 epochs of 2 batches; returns the module and the TensorBoard
    events, after checking that no explanation failed."""
    torch._dynamo.reset()
    pl.seed_everything(0)
    module = ViTClassifier(**TINY)
    run = trainer(tmp_path, [monitor] if monitor else [], TensorBoardLogger(str(tmp_path), name=name), epochs=2,
                  limit_train_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(torch.compile(module, backend=backend), datamodule=datamodule())
    failed = [str(w.message) for w in caught if "lightning-xai" in str(w.message) and "failed" in str(w.message)]
    assert not failed, failed
    assert module._compiler_ctx is not None and "forward" in vars(module)  # training kept the compiled forward
    events = EventAccumulator(run.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    return module, events


def test_fit_of_a_compiled_lightning_module_explains_without_retracing_its_graph(tmp_path):
    """Lightning unwraps the compiled module and compiles its forward in place (``_compiler_ctx``). The explainers'
    hooks were not in the traced graph: dynamo re-traced the forward for the explanation passes (new hooks, grad
    mode, probe shapes), and with inductor GradToken/GAE failed with 'not used in the graph' at every event. The
    explanation pass now runs the original forward: the fit compiles exactly the frames it compiles without
    the callback, and the default methods log maps at both events."""
    from torch._dynamo.testing import CompileCounterWithBackend

    without = CompileCounterWithBackend("eager")
    fit_compiled(tmp_path, without, name="plain")
    counted = CompileCounterWithBackend("eager")
    monitor = ExplanationMonitor(num_probes=2)  # the default methods
    _, events = fit_compiled(tmp_path, counted, monitor)
    assert counted.frame_count == without.frame_count > 0
    for method in monitor.methods:
        assert len(events.Images(f"xai/{method}/overlay/0")) == 2, method


def test_a_module_compiled_in_place_is_explained_through_its_original_forward():
    """``module.compile()`` (torch's in-place compile): explaining runs the original forward, so the compiled
    graph is neither re-traced for the explainers' hooks nor left without them; it stays compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    vit = make_vit(depth=2)
    images = torch.randn(2, 3, 32, 32)
    expected = {method: lx.explain(vit, images, method=method).raw for method in ("gradtoken", "c2f")}
    counter = CompileCounterWithBackend("eager")
    vit.compile(backend=counter)
    with torch.no_grad():
        vit(images)
    traced = counter.frame_count
    for method, maps in expected.items():
        torch.testing.assert_close(lx.explain(vit, images, method=method).raw, maps)
    assert counter.frame_count == traced > 0 and vit._compiled_call_impl is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LIGHTNING_XAI_TEST_INDUCTOR"),
    reason="the default inductor backend compiles for minutes on a shared 2-core CPU (the eager-backend test above "
    "covers the traced graph); set LIGHTNING_XAI_TEST_INDUCTOR=1 to run it",
)
def test_fit_of_an_inductor_compiled_lightning_module_logs_the_default_methods(tmp_path):
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("inductor needs a C compiler on CPU")
    monitor = ExplanationMonitor(num_probes=2)
    _, events = fit_compiled(tmp_path, "inductor", monitor)
    for method in monitor.methods:
        assert len(events.Images(f"xai/{method}/overlay/0")) == 2, method


# -- 3: gradient checkpointing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224"])
def test_timm_gradient_checkpointing_gives_the_same_maps(name):
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=48,
                            num_heads=3, num_classes=4).eval()
    images = torch.randn(2, 3, 32, 32)
    for method in ("gradtoken", "gae", "c2f"):
        expected = lx.explain(vit, images, method=method, targets=[[0, 1], [2, 3]]).raw
        vit.set_grad_checkpointing(True)
        try:
            got = lx.explain(vit, images, method=method, targets=[[0, 1], [2, 3]]).raw
        finally:
            vit.set_grad_checkpointing(False)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    vit.set_grad_checkpointing(True)
    lx.explain(vit, images)
    assert vit.grad_checkpointing  # restored after the explanation pass


def test_hugging_face_gradient_checkpointing_gives_the_same_maps():
    pytest.importorskip("transformers")
    from family_models import hf_vit_from_timm, timm_vit

    model = hf_vit_from_timm(timm_vit())
    images = torch.randn(2, 3, 32, 32)
    expected = lx.explain(model, images, method="gradtoken").raw
    model.gradient_checkpointing_enable()
    model.train()
    torch.testing.assert_close(lx.explain(model, images, method="gradtoken").raw, expected, rtol=1e-5, atol=1e-5)
    assert model.training


def test_training_with_gradient_checkpointing_logs_maps(tmp_path):
    pl.seed_everything(0)
    module = ViTClassifier(**TINY)
    module.model.set_grad_checkpointing(True)
    monitor = ExplanationMonitor(methods=["gradtoken", "gae"], num_probes=2, on_error="raise")
    trainer(tmp_path, [monitor], epochs=1, limit_train_batches=2).fit(module, datamodule=datamodule())
    outcome = monitor.runner.run(on_failure=lambda name, err: pytest.fail(f"{name}: {err}"))
    module.model.set_grad_checkpointing(False)
    for method in ("gradtoken", "gae"):
        plain = monitor.runner.explainers[method](outcome.images, outcome.targets).raw
        torch.testing.assert_close(outcome.results[method].raw, plain, rtol=1e-5, atol=1e-5)


# -- 6: vit= naming a ViT the forward never runs -------------------------------------------------------------------
def test_vit_naming_a_copy_the_forward_never_runs_fails_at_setup(tmp_path):
    steps = Steps()
    with pytest.raises(ValueError, match=r"vit='ema' names a VisionTransformer in WithEMA, but the forward never "
                                         r"runs it.*pass vit= the ViT whose output the forward uses.*'model'"):
        trainer(tmp_path, [ExplanationMonitor(methods=["gradtoken"], vit="ema"), steps], epochs=1).fit(
            WithEMA(**TINY), datamodule())
    assert steps.batches == 0


# -- 9: the smaller lx.explain cases ------------------------------------------------------------------------------
def test_numpy_targets_are_accepted_and_empty_targets_refused():
    vit = make_vit(depth=1)
    images = torch.randn(2, 3, 32, 32)
    expected = lx.explain(vit, images, targets=[1, 3]).raw
    torch.testing.assert_close(lx.explain(vit, images, targets=np.array([1, 3])).raw, expected)
    torch.testing.assert_close(lx.explain(vit, images, targets=np.array([[1], [3]])).raw, expected)
    assert lx.explain(vit, images, targets=np.int64(2)).targets.tolist() == [[2], [2]]
    for empty in ([], torch.empty(2, 0, dtype=torch.long), np.zeros((2, 0), dtype=int)):
        with pytest.raises(ValueError, match="at least one target per image"):
            lx.explain(vit, images, targets=empty)


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        vit = make_vit(depth=1)
    with pytest.raises(ValueError, match="meta device"):
        lx.explain(vit, torch.randn(1, 3, 32, 32))


Output = collections.namedtuple("Output", ["features", "logits"])


class NamedTupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = make_vit(depth=1)

    def forward(self, x):
        features = self.vit.forward_features(x)  # runs the blocks without the ViT's own forward (and its hooks)
        return Output(self.vit.forward_head(features, pre_logits=True), self.vit.forward_head(features))


def test_namedtuple_output_with_logits_is_read():
    module = NamedTupleOut()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(lx.explain(module, images).raw, lx.explain(module.vit, images).raw)


class BatchForward(pl.LightningModule):
    """Hugging Face style: the forward takes the whole batch dict."""

    def __init__(self):
        super().__init__()
        self.model = make_vit(depth=1)

    def forward(self, batch):
        return self.model(**batch)


def test_forward_of_a_batch_error_is_short_with_the_hint_first():
    module = BatchForward()
    for what, call in (("images", lambda: lx.explain(module, torch.randn(2, 3, 32, 32))),
                       ("probe images",
                        lambda: ProbeRunner(module, {"rollout": {}}, ProbeSet(torch.randn(2, 3, 32, 32))))):
        with pytest.raises(TypeError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"calling BatchForward.forward(images) on the {what} failed (shape (2, 3, 32, 32))"
                                  ": pass images as the module takes them")
        assert "forward=lambda module, images" in message and "must be a mapping" in message
        assert len(message) < 600 and "Block(" not in message, message


def test_gae_warns_when_no_attention_has_positive_relevance():
    """An average-pooled timm ViT initialised the JAX way (zero head) at initialisation: every gradient is zero."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            embed_dim=48, num_heads=3, num_classes=4, global_pool="avg", weight_init="jax").eval()
    with pytest.warns(NoPositiveRelevanceWarning, match="2 of 2 maps .* constant, and all zero"):
        result = lx.explain(vit, torch.randn(2, 3, 32, 32), method="gae")
    assert float(result.maps.abs().max()) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoPositiveRelevanceWarning)
        lx.explain(make_vit(depth=2, global_pool="avg"), torch.randn(2, 3, 32, 32), method="gae")
