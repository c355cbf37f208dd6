"""Numeric cross-checks of each method against direct, loop-based implementations of METHODS.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit

import lightning_xai as lx
from lightning_xai.adapters import capture, geometry
from lightning_xai.explainers.masks import vitcx_masks

TARGETS = torch.tensor([[0, 3], [2, 1], [4, 4]])


@pytest.fixture(scope="module")
def model():
    return make_vit(reg_tokens=2, depth=3)  # P = 3 prefix tokens: catches off-by-prefix errors


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _attention(model, x):
    with torch.no_grad(), capture(model, ("attn",)) as record:
        model(x)
    return record.attn


def test_raw_attention_is_last_block_class_row(model, images):
    attn = _attention(model, images)[-1]
    expected = attn.mean(1)[:, 0, 3:].reshape(3, 4, 4)
    result = lx.explain(model, images, method="raw_attention")
    torch.testing.assert_close(result.patch_maps[:, 0], expected)


@pytest.mark.parametrize("start", [0, 1])
def test_rollout_equals_direct_product(model, images, start):
    attn = _attention(model, images)
    for b in range(3):
        product = torch.eye(attn[0].shape[-1], dtype=torch.float64)
        for layer in attn[start:]:
            a = layer[b].double().mean(0) + torch.eye(layer.shape[-1], dtype=torch.float64)
            product = (a / a.sum(1, keepdim=True)) @ product
        result = lx.explain(model, images[b : b + 1], method="rollout", start_layer=start)
        torch.testing.assert_close(result.patch_maps[0, 0].double(), product[0, 3:].reshape(4, 4))


def _attention_and_grads(model, image, target):
    x = image[None].clone().requires_grad_(True)
    with capture(model, ("attn",)) as record:
        logit = model(x)[0, target]
    return record.attn, torch.autograd.grad(logit, record.attn)


def test_gae_equals_direct_implementation(model, images):
    result = lx.explain(model, images, method="gae", targets=TARGETS)
    for b in range(3):
        for k in range(2):
            attn, grads = _attention_and_grads(model, images[b], int(TARGETS[b, k]))
            tokens = attn[0].shape[-1]
            relevance = torch.eye(tokens)
            for a, g in zip(attn, grads, strict=True):
                relevance = relevance + torch.relu(g[0] * a[0]).mean(0) @ relevance
            torch.testing.assert_close(result.patch_maps[b, k], relevance[0, 3:].reshape(4, 4))


def test_gradtoken_equals_class_aware_gradient_on_values(model, images):
    """c_i = relu(Σ_h A[h,0,P+i] <dy/do_h, v_{h,P+i}>): computed through the values, not through dy/dA."""
    result = lx.explain(model, images, method="gradtoken", targets=TARGETS)
    heads, head_dim = model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
    for b in range(3):
        for k in range(2):
            values: list = []
            outputs: list = []
            hooks = []
            for block in model.blocks:
                hooks.append(block.attn.qkv.register_forward_hook(lambda _m, _i, out, vs=values: vs.append(out)))
                hooks.append(block.attn.norm.register_forward_hook(lambda _m, i, _o, os=outputs: os.append(i[0])))
            with capture(model, ("attn",)) as record:
                logit = model(images[b : b + 1])[0, int(TARGETS[b, k])]
            for h in hooks:
                h.remove()
            grads_o = torch.autograd.grad(logit, outputs)
            total = torch.zeros(16)
            for qkv, grad_o, a in zip(values, grads_o, record.attn, strict=True):
                v = qkv[0].reshape(-1, 3, heads, head_dim)[:, 2]  # (T, H, hd)
                g = grad_o[0, 0].reshape(heads, head_dim)  # class token's output, per head
                per_head = torch.einsum("hd,thd->ht", g, v)[:, 3:] * a[0, :, 0, 3:].detach()
                total += torch.relu(per_head.sum(0))
            torch.testing.assert_close(result.patch_maps[b, k], total.reshape(4, 4), rtol=1e-4, atol=1e-6)


def test_gradtoken_layer_options(model, images):
    full = lx.explain(model, images, method="gradtoken")
    parts = [lx.explain(model, images, method="gradtoken", layers=[i]).raw for i in range(3)]
    torch.testing.assert_close(full.raw, sum(parts))
    torch.testing.assert_close(lx.explain(model, images, method="gradtoken", layers=2).raw, parts[1] + parts[2])
    normed = lx.explain(model, images, method="gradtoken", per_layer_norm=True).raw
    assert not torch.allclose(normed, full.raw)


@pytest.mark.parametrize("method", ["raw_attention", "rollout", "gae", "gradtoken", "vitcx", "c2f"])
def test_batched_equals_one_image_at_a_time(model, images, method):
    batched = lx.explain(model, images, method=method, targets=TARGETS)
    # masked forwards are chunked differently alone and in a batch: float32 summation order differs
    tol = dict(rtol=1e-3, atol=2e-4) if method in ("vitcx", "c2f") else dict(rtol=1e-4, atol=1e-5)
    for b in range(3):
        single = lx.explain(model, images[b : b + 1], method=method, targets=TARGETS[b : b + 1])
        torch.testing.assert_close(single.maps[0], batched.maps[b], **tol)
        torch.testing.assert_close(single.raw[0], batched.raw[b], **tol)


@pytest.mark.parametrize("method", ["gae", "gradtoken", "c2f"])
def test_several_targets_equal_separate_calls(model, images, method):
    # C2F scores the union of the targets' undecided masks together: other chunks, other float32 rounding
    tol = dict(rtol=1e-3, atol=2e-4) if method == "c2f" else dict(rtol=1e-4, atol=1e-6)
    together = lx.explain(model, images, method=method, targets=TARGETS)
    for k in range(2):
        alone = lx.explain(model, images, method=method, targets=TARGETS[:, k])
        torch.testing.assert_close(alone.raw[:, 0], together.raw[:, k], **tol)
    assert torch.equal(together.targets, TARGETS)
    probs = model(images).softmax(-1).gather(1, TARGETS)
    torch.testing.assert_close(together.probs, probs.detach())


def test_vitcx_equals_direct_loop(model, images):
    result = lx.explain(model, images[:1], method="vitcx", targets=[2], seed=7)
    geom = geometry(model, (32, 32))
    with torch.no_grad(), capture(model, ("norm1",)) as record:
        clean = model(images[:1]).softmax(-1)[0, 2]
    masks, _ = vitcx_masks(record.norm1[-1], geom, 0.1)
    masks = masks[0]
    explainer = lx.create_explainer("vitcx", model, seed=7)
    noise = explainer.mask_scorer(images[:1], masks[None], torch.tensor([[2]]), clean.view(1, 1)).noise
    numerator = torch.zeros(32, 32)
    with torch.no_grad():
        for i, mask in enumerate(masks):
            eps = noise(torch.tensor([0]), torch.tensor([i]))[0]
            masked = model((images[0] * mask + eps * (1 - mask))[None]).softmax(-1)[0, 2]
            noisy = model((images[0] + eps * (1 - mask))[None]).softmax(-1)[0, 2]
            numerator += (masked - noisy + clean) * mask
    expected = numerator / masks.sum(0).clamp_min(1e-6) / len(masks)
    torch.testing.assert_close(result.raw[0, 0], expected, rtol=1e-4, atol=1e-6)
    assert float(result.evaluations[0]) == 1 + 2 * len(masks)


def test_vitcx_masks_are_merged_min_max_channels(model, images):
    geom = geometry(model, (32, 32))
    with torch.no_grad(), capture(model, ("norm1",)) as record:
        model(images)
    masks, valid = vitcx_masks(record.norm1[-1], geom, 0.1)
    assert masks.shape[0] == 3 and masks.shape[2:] == (32, 32)
    assert 1 <= int(valid.sum(1).min()) and int(valid.sum(1).max()) <= 48
    kept = masks[valid]
    torch.testing.assert_close(kept.flatten(1).amax(1), torch.ones(len(kept)))
    torch.testing.assert_close(kept.flatten(1).amin(1), torch.zeros(len(kept)))
    looser = vitcx_masks(record.norm1[-1], geom, 0.5)[1].sum(1)
    assert (looser <= valid.sum(1)).all()  # a looser threshold merges more


def test_c2f_with_everything_positive_reduces_to_vitcx(model, images):
    vitcx = lx.explain(model, images, method="vitcx", targets=TARGETS)
    c2f = lx.explain(model, images, method="c2f", targets=TARGETS, thresholds=[(0.0, 0.0)], draws=[1])
    torch.testing.assert_close(c2f.coarse, vitcx.maps, rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(c2f.evaluations, vitcx.evaluations)
    torch.testing.assert_close(c2f.fine, c2f.maps)


def test_c2f_attention_fusion_by_hand(model, images):
    result = lx.explain(model, images[:1], method="c2f", targets=[1], fusion="contrast")
    attn = _attention(model, images[:1])
    relation = torch.eye(attn[0].shape[-1])
    for layer in attn:
        a = layer[0].mean(0) + torch.eye(layer.shape[-1])
        relation = (a / a.sum(1, keepdim=True)) @ relation
    q = relation[3:, 3:]
    c = F.adaptive_avg_pool2d(result.coarse[0], (4, 4)).flatten()
    fg, bg = (c @ q) / c.sum(), ((1 - c) @ q) / (1 - c).sum()
    importance = torch.relu(F.cosine_similarity(q, fg[None]) - F.cosine_similarity(q, bg[None]))
    importance = (importance - importance.min()) / (importance.max() - importance.min())
    up = F.interpolate(importance.reshape(1, 1, 4, 4), size=(32, 32), mode="bilinear", align_corners=False)
    fine = result.coarse[0, 0] * up[0, 0]
    fine = (fine - fine.min()) / (fine.max() - fine.min())
    torch.testing.assert_close(result.fine[0, 0], fine, rtol=1e-4, atol=1e-5)


def test_c2f_decides_in_stages_and_spends_draws_only_on_deferred_masks(model, images):
    one_stage = lx.explain(model, images, method="c2f", thresholds=[(0.5, 0.5)], draws=[1])
    vitcx = lx.explain(model, images, method="vitcx")
    torch.testing.assert_close(one_stage.evaluations, vitcx.evaluations)
    # a wide undecidable band in stage 1 sends the masks with 0 < v < 1 on to stage 2 with two more draws
    deferred = lx.explain(model, images, method="c2f", thresholds=[(1.0, 0.0), (0.5, 0.5)], draws=[1, 2])
    value = (one_stage_scores(model, images) / vitcx.probs[:, None, 0]).clamp(0, 1)
    undecided = ((value > 0) & (value < 1)).sum(1)
    torch.testing.assert_close(deferred.evaluations, vitcx.evaluations + 4 * undecided)


def one_stage_scores(model, images):
    """ViT-CX scores s_i of every valid mask (draw 0), ``(B, n)``, padding as NaN."""
    explainer = lx.create_explainer("vitcx", model)
    geom = geometry(model, (32, 32))
    with torch.no_grad(), capture(model, ("norm1",)) as record:
        probs = model(images).softmax(-1)
    targets = probs.argmax(-1, keepdim=True)
    masks, valid = vitcx_masks(record.norm1[-1], geom, 0.1)
    scorer = explainer.mask_scorer(images, masks, targets, probs.gather(1, targets))
    scores = scorer(valid, torch.zeros(valid.shape, dtype=torch.long))[..., 0]
    return scores.masked_fill(~valid, float("nan"))


def test_c2f_cluster_granularity_is_cheaper(model, images):
    clusters = lx.explain(model, images, method="c2f", granularity="clusters")
    vitcx = lx.explain(model, images, method="vitcx")
    assert (clusters.evaluations <= vitcx.evaluations).all()
    assert clusters.maps.shape == (3, 1, 32, 32) and torch.isfinite(clusters.raw).all()


def test_vitcx_noise_is_seeded(model, images):
    a = lx.explain(model, images, method="vitcx", seed=1).raw
    b = lx.explain(model, images, method="vitcx", seed=1).raw
    c = lx.explain(model, images, method="vitcx", seed=2).raw
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- readout rows (METHODS.md, "The readout rows"): what the head reads decides the rows -------------------------
def _direct_readout_maps(model, image, target, rows, weights):
    """Raw attention, rollout, GAE and GradToken computed directly on the readout rows ``rows`` (weights
    ``weights``), one image, one target, by loops over blocks: ``{method: (N,)}``."""
    x = image[None].clone().requires_grad_(True)
    with capture(model, ("attn",)) as record:
        logit = model(x)[0, target]
    grads = torch.autograd.grad(logit, record.attn)
    attn = [a[0].detach() for a in record.attn]
    prefix = attn[0].shape[-1] - 16
    w = torch.tensor(weights)[:, None]
    tokens = attn[0].shape[-1]
    rollout, gae = torch.eye(tokens), torch.eye(tokens)
    gradtoken = torch.zeros(16)
    for a, g in zip(attn, grads, strict=True):
        step = a.mean(0) + torch.eye(tokens)
        rollout = (step / step.sum(1, keepdim=True)) @ rollout
        gae = gae + torch.relu(g[0] * a).mean(0) @ gae
        gradtoken += torch.relu(((a[:, rows, prefix:] * g[0][:, rows, prefix:]) * w).sum((0, 1)))
    return {
        "raw_attention": (attn[-1].mean(0)[rows, prefix:] * w).sum(0),
        "rollout": (rollout[rows, prefix:] * w).sum(0),
        "gae": (gae[rows, prefix:] * w).sum(0),
        "gradtoken": gradtoken,
    }


READOUT_CASES = {
    # a class token the head never reads: timm global_pool="avg" keeps it (BEiT and EVA-02 are built so)
    "avg_with_class_token": (dict(global_pool="avg"), list(range(1, 17)), [1 / 16] * 16),
    "avg_registers_no_class_token": (dict(global_pool="avg", class_token=False, reg_tokens=2, fc_norm=False),
                                     list(range(2, 18)), [1 / 16] * 16),
    "avg_including_prefix": (dict(global_pool="avg", pool_include_prefix=True), list(range(17)), [1 / 17] * 17),
    "token_with_registers": (dict(reg_tokens=2), [0], [1.0]),
}


@pytest.mark.parametrize("case", list(READOUT_CASES))
def test_maps_read_the_rows_the_head_reads(images, case):
    kwargs, rows, weights = READOUT_CASES[case]
    model = make_vit(depth=2, **kwargs)
    expected = [_direct_readout_maps(model, images[b], target, rows, weights) for b, target in enumerate((1, 3))]
    for method in ("raw_attention", "rollout", "gae", "gradtoken"):
        result = lx.explain(model, images[:2], method=method, targets=[1, 3])
        for b in range(2):
            torch.testing.assert_close(result.patch_maps[b, 0].flatten(), expected[b][method], rtol=1e-4, atol=1e-7)


def test_average_pooled_model_with_class_token_has_a_live_last_block(images):
    """The failure of reading row 0 on a model whose head averages the patches: no gradient reaches the class
    token's row of the last block, so GradToken's last block was exactly zero and every map read dead rows."""
    model = make_vit(global_pool="avg")
    last = lx.explain(model, images, method="gradtoken", layers=[-1])
    assert float(last.raw.amax()) > 0
    with capture(model, ("attn",)) as record:
        logit = model(images)[:, 0].sum()
    grad = torch.autograd.grad(logit, record.attn[-1])[0]
    assert float(grad[:, :, 0].abs().max()) == 0  # row 0 of the last block: dead for this head
    assert float(grad[:, :, 1:].abs().max()) > 0


def test_distilled_head_reads_class_and_distillation_rows(images):
    """DeiT's distilled head averages its class and distillation heads: readout rows 0 and 1, averaged."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=5, depth=2, embed_dim=48, num_heads=3).eval()
    assert geometry(model, (32, 32)).readout.groups == ("class", "distillation")
    expected = _direct_readout_maps(model, images[0], 2, [0, 1], [0.5, 0.5])
    for method in ("raw_attention", "rollout", "gae", "gradtoken"):
        result = lx.explain(model, images[:1], method=method, targets=[2])
        torch.testing.assert_close(result.patch_maps[0, 0].flatten(), expected[method], rtol=1e-4, atol=1e-7)
