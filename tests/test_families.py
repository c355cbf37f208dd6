"""Every method on every supported model family, proved by agreement: the same weights loaded into a timm ViT and
into its torchvision / Hugging Face equivalent give the same maps. Plus the families' limits (clear errors),
torch.compile, dtypes, option checks and the public extension contract."""

from __future__ import annotations

import copy
import os
import shutil
import sys

import pytest
import timm
import torch
import torchvision
from conftest import make_vit
from family_models import (
    PixelValues,
    hf_config,
    hf_deit_from_timm,
    hf_vit_from_timm,
    timm_vit,
    torchvision_from_timm,
)
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
from torch import nn

import lightning_xai as lx
from lightning_xai.adapters import capture, find_vit, geometry

ALL_METHODS = ["raw_attention", "rollout", "gae", "gradtoken", "vitcx", "c2f"]
TARGETS = torch.tensor([[0, 3], [2, 1], [1, 1]])


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pairs():
    """``{name: (timm model, equivalent model of another family)}`` with identical weights."""
    pytest.importorskip("transformers", reason="the Hugging Face family needs the hf extra")
    vit = timm_vit()
    deit = timm_vit(model_name="deit_tiny_distilled_patch16_224")
    return {
        "torchvision": (vit, torchvision_from_timm(vit)),
        "hf_vit": (vit, PixelValues(hf_vit_from_timm(vit))),
        "hf_deit_distilled": (deit, PixelValues(hf_deit_from_timm(deit))),
    }


# -- agreement across families ---------------------------------------------------------------------------------------
def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("family", ["torchvision", "hf_vit", "hf_deit_distilled"])
def test_same_weights_same_logits(pairs, images, family):
    reference, other = pairs[family]
    with torch.no_grad():
        torch.testing.assert_close(other(images), reference(images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("family", ["torchvision", "hf_vit", "hf_deit_distilled"])
def test_same_weights_same_maps(pairs, images, family, method):
    reference, other = pairs[family]
    count = 1 if method in ("vitcx", "c2f") else 3  # the mask methods cost tens of forwards per image
    expected = lx.explain(reference, images[:count], method=method, targets=TARGETS[:count])
    result = lx.explain(other, images[:count], method=method, targets=TARGETS[:count])
    assert torch.isfinite(result.raw).all() and float(result.raw.abs().max()) > 0
    # one-pass methods agree to float32 rounding; the mask methods sum many masked forwards in another order
    tolerance = 1e-3 if method in ("vitcx", "c2f") else 1e-5
    assert _relative_difference(expected.raw, result.raw) < tolerance
    torch.testing.assert_close(result.maps, expected.maps, rtol=0, atol=20 * tolerance)
    if expected.patch_maps is not None:
        assert result.patch_maps.shape == expected.patch_maps.shape


def test_geometry_and_readout_of_each_family(pairs):
    (_, tv), (_, hf), (_, deit) = pairs["torchvision"], pairs["hf_vit"], pairs["hf_deit_distilled"]
    for module, prefix, groups in ((tv, 1, ("class",)), (hf, 1, ("class",)), (deit, 2, ("class", "distillation"))):
        geom = geometry(find_vit(module), (32, 32))
        assert (geom.num_prefix, geom.grid, geom.readout.groups) == (prefix, (4, 4), groups)
    with pytest.raises(ValueError, match="built for 32x32"):
        geometry(tv, (40, 40))


HF_OTHERS = {
    # class -> (config class, config options, prefix tokens, readout groups)
    "Dinov2ForImageClassification": ("Dinov2Config", dict(mlp_ratio=2), 1, ("class", "patches")),
    "Dinov2WithRegistersForImageClassification": (
        "Dinov2WithRegistersConfig", dict(mlp_ratio=2, num_register_tokens=2), 3, ("class", "patches")),
    "BeitForImageClassification": ("BeitConfig", dict(use_mean_pooling=True), 1, ("patches",)),
    "DeiTForImageClassification": ("DeiTConfig", {}, 2, ("class",)),
}


@pytest.mark.parametrize("cls_name", list(HF_OTHERS))
def test_other_hugging_face_classes_every_method(images, cls_name):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face family needs the hf extra")
    config_name, options, prefix, groups = HF_OTHERS[cls_name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(hf_config(config_name, **options)).eval()
    geom = geometry(model, (32, 32))
    assert (geom.num_prefix, geom.readout.groups) == (prefix, groups)
    for method in ALL_METHODS:
        options = {"granularity": "clusters"} if method == "c2f" else {}  # the cheap C2F: a few forwards
        result = lx.explain(model, images[:1], method=method, forward=lambda m, x: m(pixel_values=x),
                            output_transform=lambda out: out.logits, **options)
        assert result.maps.shape == (1, 1, 32, 32)
        assert torch.isfinite(result.raw).all() and float(result.raw.abs().max()) > 0
    # the readout rows are live: GradToken's last block is not all zero
    last = lx.explain(model, images[:2], method="gradtoken", layers=[-1], forward=lambda m, x: m(pixel_values=x))
    assert float(last.raw.amax()) > 0


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "eva02_tiny_patch14_224"])
def test_timm_beit_and_eva02_average_the_patches_by_default(images, name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                              num_classes=3).eval()
    assert geometry(model, (32, 32)).readout.groups == ("patches",)
    for method in ALL_METHODS:
        options = {"granularity": "clusters"} if method == "c2f" else {}
        result = lx.explain(model, images[:1], method=method, **options)
        assert torch.isfinite(result.raw).all() and float(result.raw.abs().max()) > 0
    assert float(lx.explain(model, images[:1], method="gradtoken", layers=[-1]).raw.amax()) > 0


def test_capture_switches_are_undone_also_on_errors(pairs, images):
    tv = pairs["torchvision"][1]
    hf = pairs["hf_vit"][1]
    implementation = hf.model.config._attn_implementation
    assert implementation != "eager"  # sdpa by default: probabilities are not materialised in training

    def broken(_):
        raise RuntimeError("boom")

    for module in (tv, hf):
        with pytest.raises(RuntimeError, match="boom"):
            lx.explain(module, images, method="gradtoken", output_transform=broken)
    assert hf.model.config._attn_implementation == implementation
    assert all("forward" not in vars(block.self_attention) for block in tv.encoder.layers)
    with capture(tv, ("attn", "norm1", "tokens")) as record:
        tv(images)
    assert record.attn[0].shape == (3, 2, 17, 17) and record.norm1[1].shape == record.tokens[1].shape == (3, 17, 32)
    torch.testing.assert_close(record.attn[1].sum(-1), torch.ones(3, 2, 17))


# -- limits: clear errors naming the family ----------------------------------------------------------------------------
def _timm(name, **kwargs):
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)


UNSUPPORTED = {
    "CaiT": lambda: _timm("cait_xxs24_224", img_size=32, patch_size=8, depth=1, depth_token_only=1, embed_dim=32,
                          num_heads=2),
    "XCiT": lambda: _timm("xcit_nano_12_p8_224", img_size=32, depth=1),
    "Swin": lambda: _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=2, depths=(1, 1), embed_dim=16,
                          num_heads=(1, 1)),
    "PiT": lambda: _timm("pit_ti_224", img_size=32),
    "LeViT": lambda: _timm("levit_128s", img_size=32),
    "MViT": lambda: MultiScaleVit(cfg=MultiScaleVitCfg(depths=(1, 1), embed_dim=(16, 32), num_heads=(1, 2)),
                                  img_size=(32, 32), num_classes=3),
    "torchvision Swin": lambda: torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=3),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_families_are_named(name):
    model = UNSUPPORTED[name]().eval()
    family = name.split()[-1]
    for module in (model, nn.Sequential(nn.Identity(), model)):  # alone and nested in a wrapper
        message = rf"a model of the .*{family}.* family, which lightning-xai does not support"
        with pytest.raises(TypeError, match=message) as error:
            lx.create_explainer("gradtoken", module)
        assert "vit=" not in str(error.value)  # pointing at the model cannot help
    with pytest.raises(TypeError, match=rf"{family}.*not support"):
        find_vit(nn.Sequential(model), vit="0")


def test_vit_hint_only_where_it_can_help():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(TypeError, match="no supported Vision Transformer found.*vit='attribute.path'"):
        lx.create_explainer("gradtoken", cnn)


def test_attention_pooling_names_the_methods_that_work(images):
    model = make_vit(global_pool="map", class_token=False, depth=2)
    for method in ("raw_attention", "rollout", "gae", "gradtoken"):
        # the methods that work are named (a method another test registered may be listed too)
        with pytest.raises(ValueError, match=r"(?s)attention pooling, global_pool='map'(?=.*'c2f')(?=.*'vitcx')"):
            lx.create_explainer(method, model)
    for method in ("vitcx", "c2f"):  # masks come from the patch tokens, the relation from rollout's patch block
        result = lx.explain(model, images[:1], method=method)
        assert torch.isfinite(result.raw).all()


def test_missing_or_old_transformers_names_the_install_command(monkeypatch, pairs):
    hf = pairs["hf_vit"][1]
    transformers = sys.modules["transformers"]
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "lightning-xai\[hf\]"'):
        lx.create_explainer("gradtoken", hf)
    monkeypatch.setitem(sys.modules, "transformers", transformers)
    monkeypatch.setattr(transformers, "__version__", "4.40.0")
    with pytest.raises(ImportError, match=r"4.40.0 is too old.*lightning-xai\[hf\]"):
        lx.create_explainer("gradtoken", hf)


# -- torch.compile and dtypes ----------------------------------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x)


def test_compiled_models_are_explained_through_their_original_module(images):
    """Dynamo's ``eager`` backend traces and guards like the default one without needing a C compiler (inductor
    takes minutes on this CPU); the compiled graph is what broke gradient capture. Training keeps it."""
    model = make_vit(depth=2)
    compiled = torch.compile(model, backend="eager")
    holder = Holder(torch.compile(copy.deepcopy(model), backend="eager"))
    with torch.no_grad():
        compiled(images), holder(images)  # traced before explaining, as after a training epoch
    for method in ("gradtoken", "gae", "vitcx"):
        expected = lx.explain(model, images[:1], method=method, targets=TARGETS[:1]).raw
        for module in (compiled, holder):
            result = lx.explain(module, images[:1], method=method, targets=TARGETS[:1]).raw
            torch.testing.assert_close(result, expected)
    assert type(holder.backbone).__name__ == "OptimizedModule"  # the compiled module is back for training
    assert find_vit(compiled) is model


def test_a_model_compiled_or_swapped_after_a_first_explanation_is_explained_through_its_original_modules(images):
    """The compiled parts are looked up at every call, not remembered from the first: a backbone swapped for its
    compiled version, then one compiled in place, after the explainer has run, are both explained through their
    original forwards (the compiled graphs are not traced again, the maps do not change) and kept for training."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    vit = make_vit(depth=2)
    holder = Holder(vit)
    explainer = lx.create_explainer("gradtoken", holder)
    expected = explainer(images, TARGETS).raw
    assert not explainer.handle.compiled
    swapped_counter, in_place_counter = CompileCounterWithBackend("eager"), CompileCounterWithBackend("eager")

    holder.backbone = torch.compile(vit, backend=swapped_counter)
    with torch.no_grad():
        holder(images)
    traced = swapped_counter.frame_count
    assert explainer.handle.compiled
    torch.testing.assert_close(explainer(images, TARGETS).raw, expected)
    assert swapped_counter.frame_count == traced > 0 and type(holder.backbone).__name__ == "OptimizedModule"

    holder.backbone = vit
    vit.compile(backend=in_place_counter)
    with torch.no_grad():
        holder(images)
    traced = in_place_counter.frame_count
    assert explainer.handle.compiled
    torch.testing.assert_close(explainer(images, TARGETS).raw, expected)
    assert in_place_counter.frame_count == traced > 0 and vit._compiled_call_impl is not None


def test_nested_uncompiled_contexts_restore_the_compiled_modules_once_on_the_outer_exit(images):
    """``ModelHandle.uncompiled`` nested in itself (the explainers' forwards inside ``explaining``) leaves the
    swap to the outer context, also after an error inside."""
    vit = make_vit(depth=2)
    holder = Holder(torch.compile(vit, backend="eager"))
    handle = lx.create_explainer("gradtoken", holder).handle
    compiled = holder.backbone
    with handle.uncompiled():
        with handle.uncompiled():
            assert holder.backbone is vit
        assert holder.backbone is vit  # the inner exit did not put the compiled module back
    assert holder.backbone is compiled
    with pytest.raises(RuntimeError, match="inside"), handle.uncompiled():
        raise RuntimeError("inside")
    assert holder.backbone is compiled
    with handle.uncompiled():  # the error left nothing behind: the next context swaps again
        assert holder.backbone is vit
    assert holder.backbone is compiled


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LIGHTNING_XAI_TEST_INDUCTOR"),
    reason="the default inductor backend compiles for 1-1.5 minutes on a shared 2-core CPU (the eager-backend test "
    "above covers the traced graph); "
    "set LIGHTNING_XAI_TEST_INDUCTOR=1 to run it",
)
def test_inductor_compiled_model(images):
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("inductor needs a C compiler on CPU")
    model = make_vit(depth=2)
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(images)
    for method in ("gradtoken", "gae", "vitcx"):
        expected = lx.explain(model, images[:1], method=method).raw
        torch.testing.assert_close(lx.explain(compiled, images[:1], method=method).raw, expected)


@pytest.mark.parametrize("family", ["timm", "torchvision", "hf_vit"])
def test_float64_probes_and_bf16_models(pairs, images, family):
    model = pairs["torchvision"][0] if family == "timm" else pairs[family][1]
    half = copy.deepcopy(model).to(torch.bfloat16)
    for method, count in (("rollout", 2), ("gradtoken", 2), ("vitcx", 1)):
        probes = images[:count]
        expected = lx.explain(model, probes, method=method)
        torch.testing.assert_close(lx.explain(model, probes.double(), method=method).raw, expected.raw)
        result = lx.explain(half, probes.double(), method=method, targets=expected.targets)
        assert result.maps.dtype == torch.float32 and torch.isfinite(result.raw).all()
        if method != "vitcx":  # masks from bf16 features cluster differently; the one-pass maps stay close
            assert torch.corrcoef(torch.stack([result.maps.flatten(), expected.maps.flatten()]))[0, 1] > 0.95


# -- option values are checked without a model ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("gradtoken", {"layers": 0}, "k >= 1"),
        ("gradtoken", {"layers": "last"}, "layers must be 'all'"),
        ("gradtoken", {"layers": []}, "non-empty list"),
        ("gradtoken", {"layers": [1, True]}, "list of ints"),
        ("gradtoken", {"per_layer_norm": "yes"}, "per_layer_norm must be True or False"),
        ("gradtoken", {"objective": "prob"}, "objective must be one of"),
        ("gae", {"objective": "softmax"}, "objective must be one of"),
        ("rollout", {"start_layer": -1}, "start_layer must be an int >= 0"),
        ("rollout", {"start_layer": 1.5}, "start_layer must be an int >= 0"),
        ("rollout", {"start_layer": True}, "start_layer must be an int >= 0"),
    ],
)
def test_bad_option_values_raise_without_a_model(method, options, message):
    with pytest.raises(ValueError, match=message):
        lx.get_explainer(method).check_options(options)


def test_good_option_values_pass_and_depth_checks_wait_for_the_model():
    assert lx.get_explainer("gradtoken").check_options({"layers": [0, -1], "per_layer_norm": True}) == {
        "layers": [0, -1], "per_layer_norm": True}
    assert lx.get_explainer("gradtoken").check_options({"layers": 12}) == {"layers": 12}  # depth unknown here
    assert lx.get_explainer("rollout").check_options({"start_layer": 5}) == {"start_layer": 5}
    with pytest.raises(ValueError, match="start_layer must be in"):
        lx.create_explainer("rollout", make_vit(depth=2), start_layer=5)


def test_option_names_follow_a_constructor_replaced_after_they_were_read():
    """The option names are read from the constructors once per class and again when one of them changes: a
    subclass's own names, a constructor replaced after a first read, and the parent left as it was."""
    from lightning_xai.explainers.gradient import GradToken

    class Sharper(GradToken):
        def __init__(self, model: nn.Module, *, sharpness: float = 1.0, **kwargs) -> None:
            super().__init__(model, **kwargs)
            self.sharpness = sharpness

    parent = GradToken.option_names()
    assert Sharper.option_names() == ["sharpness", *parent]

    def replaced(self, model: nn.Module, *, sharpness: float = 1.0, gamma: float = 2.0, **kwargs) -> None:
        GradToken.__init__(self, model, **kwargs)
        self.sharpness, self.gamma = sharpness, gamma

    Sharper.__init__ = replaced
    assert Sharper.option_names() == ["sharpness", "gamma", *parent]
    assert Sharper(make_vit(depth=2), gamma=3.0).options() == {"sharpness": 1.0, "gamma": 3.0, "layers": "all",
                                                                 "per_layer_norm": False, "objective": "logit"}
    assert GradToken.option_names() == parent


# -- the published extension contract --------------------------------------------------------------------------------
def test_a_method_written_against_the_public_contract_runs_everywhere(pairs, images):
    from lightning_xai.explainers import Explainer, Geometry, RawMaps, capture, minmax, register, unregister, upsample

    @register
    class LastBlockAttentionNorm(Explainer):
        """Norm of the last block's head-averaged attention column of each patch (a toy method)."""

        name = "test_attn_norm"

        def compute(self, x: torch.Tensor, targets, geom: Geometry) -> RawMaps:
            with torch.no_grad(), capture(self.vit, ("attn",), blocks=[-1]) as record:
                logits = self.logits(x)
            resolved = logits.argmax(-1, keepdim=True) if targets is None else torch.as_tensor(targets).view(-1, 1)
            columns = record.attn[-1].mean(1)[:, :, geom.num_prefix:].norm(dim=1)  # (B, N)
            maps = upsample(columns.unflatten(-1, geom.grid)[:, None], geom.image_size)
            return RawMaps(minmax(maps), resolved, logits.softmax(-1).gather(1, resolved))

    try:
        assert "test_attn_norm" in lx.available_methods()
        results = [lx.explain(module, images, method="test_attn_norm", targets=[0, 1, 2])
                   for module in (pairs["hf_vit"][0], pairs["torchvision"][1], pairs["hf_vit"][1])]
        assert results[0].maps.shape == (3, 1, 32, 32)
        for other in results[1:]:
            torch.testing.assert_close(other.maps, results[0].maps, rtol=1e-4, atol=1e-5)
    finally:
        unregister("test_attn_norm")
    assert "test_attn_norm" not in lx.available_methods()


# -- inside a real Trainer, through the callback's public API --------------------------------------------------------
class Classifier:
    """A tiny LightningModule around ``net`` whose forward takes an image tensor (built lazily: lightning is
    imported only by the test that trains)."""

    @staticmethod
    def build(net: nn.Module):
        import lightning.pytorch as pl

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net(x)

            def training_step(self, batch, _):
                images, labels = batch[0], batch[1]
                return nn.functional.cross_entropy(self(images), labels)

            def validation_step(self, batch, _):
                images, labels = batch[0], batch[1]
                self.log("val_loss", nn.functional.cross_entropy(self(images), labels))

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

        return Module()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["torchvision", "hf_vit"])
def test_every_method_inside_a_trainer_with_the_callback(pairs, tmp_path, family):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_xai.callbacks import ExplanationMonitor
    from lightning_xai.demos import SyntheticDataModule

    net = copy.deepcopy(pairs[family][1]).train()
    module = Classifier.build(net)
    data = SyntheticDataModule(family="shape", num_classes=4, image_size=32, num_train=64, num_val=32, batch_size=32,
                               seed=0)
    monitor = ExplanationMonitor(
        methods={name: ({"granularity": "clusters"} if name == "c2f" else {}) for name in ALL_METHODS},
        num_probes=2, on_error="raise", save_raw=True)
    logger = CSVLogger(str(tmp_path), name=family)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    root = tmp_path / family
    for method in ALL_METHODS:
        assert list(root.rglob(f"xai/{method}/epoch_0000.png")), method
        saved = torch.load(next(root.rglob(f"raw/{method}/*.pt")))
        assert saved["raw"].shape[:2] == (2, 1) and torch.isfinite(saved["raw"]).all()
        assert float(saved["raw"].abs().max()) > 0
        assert torch.isfinite(torch.tensor(monitor.last_scalars[f"xai/{method}/entropy"]))
    if family == "hf_vit":
        assert net.model.config._attn_implementation != "eager"  # training kept its attention kernel
    else:
        assert all("forward" not in vars(block.self_attention) for block in net.encoder.layers)
