"""Quality of each method's maps on the example model: localisation, faithfulness, class discrimination.

Trains the example's small ViT (``examples/train_vit.py`` defaults: texture family, 32 px, patch 4) on the
generated data once per seed, explains held-out images with known object masks and prints one Markdown table
row per method and seed, then the mean over the seeds (min-max in brackets), the issue's claims checked on
the means and per seed, and diagnostics of the mask-based methods (see ``mask_diagnostics``):

    python benchmarks/bench_quality.py              # three seeds, about 4 minutes on 2 CPU cores
    python benchmarks/bench_quality.py --quick      # fewer images and epochs, for a smoke run
    python benchmarks/bench_quality.py --depth 6 --lr 1e-3   # 6 blocks instead of 4, about 6 minutes

On a busy machine, one process per seed (``--seeds 1 --save s1.json``; ``OMP_NUM_THREADS=1`` avoids threads
waiting on each other) and ``--merge s0.json s1.json s2.json`` print the same summary (each seed is trained
from its own seed; the thread count changes float rounding, hence the trained models, slightly).

Columns: IoU at the map mean, pointing game and energy inside the object (localisation against the mask),
deletion/insertion AUC (RISE-style, blur baseline; deletion lower is better, insertion higher), class
discrimination (two-object images: share of each class's map on its own object; 0.5 = cannot tell), model
evaluations and time per image. ViT-CX and C2F share their masks and noise seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

import lightning_xai as lx
from lightning_xai.adapters import find_vit, geometry
from lightning_xai.demos import SMALL_VIT, SyntheticDataModule, TwoObjectImages, ViTClassifier
from lightning_xai.explainers.masks import channel_masks, cluster_labels, cosine_distances, informative, vitcx_masks
from lightning_xai.metrics import class_discrimination, deletion_insertion, localization

ROWS: list[tuple[str, dict]] = [
    ("raw_attention", {}),
    ("rollout", {}),
    ("gae", {}),
    ("gradtoken", {}),
    ("vitcx", {}),
    ("c2f", {}),
    ("c2f", {"fusion": "contrast"}),
    ("c2f", {"granularity": "clusters"}),
]
EXAMPLE_VIT = dict(model_name="vit_tiny_patch16_224", image_size=32, **SMALL_VIT)


def train(family: str, epochs: int, num_train: int, seed: int = 0, lr: float = 2e-3,
          **architecture) -> tuple[ViTClassifier, SyntheticDataModule]:
    """The example's model (``architecture`` overrides its layout) trained on ``family`` with a real Trainer."""
    pl.seed_everything(seed, workers=True)
    data = SyntheticDataModule(family=family, num_classes=4, image_size=32, num_train=num_train, num_val=512,
                               batch_size=64, seed=seed, val_return_mask=True)
    module = ViTClassifier(num_classes=4, lr=lr, warmup_epochs=1, **{**EXAMPLE_VIT, **architecture})
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=data)
    data.setup("fit")
    return module.eval(), data


def two_object_images(module: ViTClassifier, family: str, count: int):
    """Two-object images on which the model ranks both present classes top-2 (else the test is moot)."""
    pairs = TwoObjectImages(num_samples=count * 4, image_size=32, family=family, num_classes=4, seed=11)
    images, labels, masks = pairs.batch(count * 4)
    with torch.no_grad():
        top2 = module(images).topk(2, -1).indices.sort(-1).values
    keep = (top2 == labels.sort(-1).values).all(-1)
    return images[keep][:count], labels[keep][:count], masks[keep][:count]


def row_label(method: str, options: dict) -> str:
    """``c2f``, ``c2f (contrast)``, ``c2f (clusters)``: the method and the values of its non-default options."""
    return method + (f" ({', '.join(str(v) for v in options.values())})" if options else "")


def quality_table(module: ViTClassifier, data: SyntheticDataModule, count: int, rows=ROWS) -> list[dict]:
    images, labels, masks = data.val_set.batch(range(count))
    pair_images, pair_labels, pair_masks = two_object_images(module, data.family, count)
    with torch.no_grad():
        accuracy = float((module(images).argmax(-1) == labels).float().mean())
    print(f"\n## Map quality ({data.family} family, 32 px, patch 4, {count} validation images, "
          f"accuracy {accuracy:.2f}; {len(pair_images)} two-object images)\n")
    print("| method | IoU@mean | pointing game | energy in object | deletion AUC ↓ | insertion AUC ↑ | "
          "class discrimination | evaluations / image | ms / image |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    chance = float(masks.float().mean())
    results = []
    for method, options in rows:
        start = time.perf_counter()
        result = lx.explain(module, images, method=method, targets=labels, **options)
        ms = 1000 * (time.perf_counter() - start) / count
        scores = {k: float(v.mean()) for k, v in localization(result.maps[:, 0], masks).items()}
        curves = deletion_insertion(module, images, result.maps[:, 0], labels)
        pair = lx.explain(module, pair_images, method=method, targets=pair_labels, **options)
        discrimination = float(class_discrimination(pair.maps, pair_masks).mean())
        evals = result.evaluations_per_image
        label = row_label(method, options)
        row = dict(method=label, iou=scores["iou"], pointing=scores["pointing_game"],
                   energy=scores["energy_pointing_game"], deletion=float(curves["deletion_auc"].mean()),
                   insertion=float(curves["insertion_auc"].mean()), discrimination=discrimination,
                   evaluations=1.0 if evals is None else float(evals), ms=ms)
        results.append(row)
        print(f"| {label} | {row['iou']:.3f} | {row['pointing']:.2f} | {row['energy']:.3f} | {row['deletion']:.3f} | "
              f"{row['insertion']:.3f} | {row['discrimination']:.3f} | {row['evaluations']:.1f} | {ms:.1f} |",
              flush=True)
    print(f"\nChance level of 'energy in object' (mean mask area): {chance:.3f}")
    return results


def float64_cosine_distances(masks: torch.Tensor) -> np.ndarray:
    """The float64 CPU reference for ``masks.cosine_distances`` (what the library computed before issue 9)."""
    flat = torch.nn.functional.normalize(masks.flatten(1).double().cpu(), dim=1)
    return (1.0 - flat @ flat.T).clamp_min(0).fill_diagonal_(0).numpy()


def same_merges_as_float64(features: torch.Tensor, geom, threshold: float = 0.1) -> float:
    """Share of images whose clustering labels (so merged masks) are identical with float32 distances (the
    library's) and float64 ones: ``features`` ``(B, T, D)``."""
    same = []
    for feats in features:
        masks = informative(channel_masks(feats, geom))
        same.append(np.array_equal(cluster_labels(cosine_distances(masks), threshold),
                                   cluster_labels(float64_cosine_distances(masks), threshold)))
    return float(np.mean(same))


def mask_diagnostics(module: ViTClassifier, data: SyntheticDataModule, count: int,
                     alpha: float = 0.8) -> dict[str, float]:
    """Why the perturbation methods localise as they do: is the class evidence inside the object, and how
    well could any map built from ViT-CX's masks (which C2F shares) localise at all?

    Prints the target probability with only the object kept and with the object removed (pixels set to the
    dataset mean), the number of merged masks per image, the share of masks whose noise-free decision value
    ``p_c(x ⊙ M) / p_c(x)`` reaches S3WM's first positive threshold ``alpha``, and the best IoU (at the
    mask's mean) that a single mask reaches against the object (mean over images). Returns those figures.
    """
    images, labels, masks = data.val_set.batch(range(count))
    objects = masks.float().reshape(count, 1, *images.shape[-2:])
    vit = find_vit(module)
    features: dict[str, torch.Tensor] = {}
    hook = vit.blocks[-1].norm1.register_forward_hook(lambda _m, _i, out: features.__setitem__("norm1", out))
    try:
        with torch.no_grad():
            clean = module(images).softmax(-1).gather(1, labels[:, None])[:, 0]
    finally:
        hook.remove()
    with torch.no_grad():
        kept = module(images * objects).softmax(-1).gather(1, labels[:, None])[:, 0]
        removed = module(images * (1 - objects)).softmax(-1).gather(1, labels[:, None])[:, 0]
    geom = geometry(vit, tuple(images.shape[-2:]))
    merged, valid = vitcx_masks(features["norm1"], geom, 0.1)
    best_iou, values = [], []
    with torch.no_grad():
        for b in range(count):  # a diagnostic, not an explainer: one image's masks per forward
            mask = merged[b, valid[b]]
            values.append(module(images[b] * mask[:, None]).softmax(-1)[:, labels[b]] / clean[b])
            above = mask > mask.flatten(1).mean(1)[:, None, None]
            inside = objects[b, 0] > 0.5
            best_iou.append(((above & inside).flatten(1).sum(1) / (above | inside).flatten(1).sum(1)).max())
    values = torch.cat(values)
    figures = dict(clean=float(clean.mean()), object_only=float(kept.mean()), object_removed=float(removed.mean()),
                   masks=float(valid.sum(1).float().mean()), positive=float((values >= alpha).float().mean()),
                   best_mask_iou=float(torch.stack(best_iou).mean()),
                   same_merges=same_merges_as_float64(features["norm1"], geom))
    print(f"\n- diagnostics: target probability clean {figures['clean']:.3f}, object only "
          f"{figures['object_only']:.3f}, object removed {figures['object_removed']:.3f}; "
          f"{figures['masks']:.1f} merged masks per image, {figures['positive']:.2f} of them with "
          f"p_c(x * M) / p_c(x) >= {alpha}; best single mask's IoU with the object {figures['best_mask_iou']:.3f}; "
          f"merged masks identical to float64 distances' on {figures['same_merges']:.3f} of the images")
    return figures


DISCRIMINATION = 0.75  # class discrimination a class-aware method must reach (0.5: cannot tell the classes apart)


def claims(results: list[dict]) -> dict[str, bool]:
    """Whether each claim of the issue holds for one table (or the table of means)."""
    by = {r["method"]: r for r in results}

    def beats(method: str, other: str) -> bool:
        return all(by[method][k] > by[other][k] for k in ("iou", "energy"))

    def separates(method: str) -> bool:
        return by[method]["discrimination"] >= DISCRIMINATION

    return {
        "C2F beats ViT-CX (IoU and energy)": beats("c2f", "vitcx"),
        f"GradToken separates the two classes (class discrimination >= {DISCRIMINATION})": separates("gradtoken"),
        f"GAE separates the two classes (class discrimination >= {DISCRIMINATION})": separates("gae"),
        "C2F (draws) at most 2x ViT-CX's evaluations": by["c2f"]["evaluations"] <= 2 * by["vitcx"]["evaluations"],
        "C2F (clusters) fewer evaluations than ViT-CX": by["c2f (clusters)"]["evaluations"]
        < by["vitcx"]["evaluations"],
    }


def comparisons(results: list[dict]) -> dict[str, bool]:
    """Comparisons reported as measured, not targets: one-object IoU against rollout, and the fusions."""
    by = {r["method"]: r for r in results}
    found = {}
    for method in ("gradtoken", "c2f", "c2f (contrast)"):
        if method in by:
            found[f"{method} ahead of rollout on IoU"] = by[method]["iou"] > by["rollout"]["iou"]
    if "c2f (contrast)" in by:
        found["c2f (relation) ahead of c2f (contrast) on IoU and energy"] = all(
            by["c2f"][k] > by["c2f (contrast)"][k] for k in ("iou", "energy"))
    return found


COLUMNS = ("iou", "pointing", "energy", "deletion", "insertion", "discrimination", "evaluations")


def summary(runs: list[list[dict]], diagnostics: list[dict[str, float]]) -> None:
    """Mean (min-max) over the seeds' tables, the claims on the means and per seed, mean diagnostics."""
    n = len(runs)
    means = []
    print(f"\n## Mean over {n} seed{'s' * (n > 1)} (min-max)\n")
    print("| method | IoU@mean | pointing game | energy in object | deletion AUC ↓ | insertion AUC ↑ | "
          "class discrimination | evaluations / image |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in range(len(runs[0])):
        values = {k: [run[row][k] for run in runs] for k in COLUMNS}
        mean = {"method": runs[0][row]["method"], **{k: sum(v) / n for k, v in values.items()}}
        means.append(mean)
        cells = [f"{mean[k]:.3f} ({min(values[k]):.2f}-{max(values[k]):.2f})" if n > 1 else f"{mean[k]:.3f}"
                 for k in COLUMNS[:-1]]
        print(f"| {mean['method']} | {' | '.join(cells)} | {mean['evaluations']:.1f} |")
    per_seed = [claims(run) for run in runs]
    print()
    for claim, holds in claims(means).items():
        count = sum(seed[claim] for seed in per_seed)
        print(f"- {'holds' if holds else 'FAILS'} on the means ({count} of {n} seeds): {claim}")
    per_seed = [comparisons(run) for run in runs]
    for comparison, holds in comparisons(means).items():
        count = sum(seed[comparison] for seed in per_seed)
        print(f"- measured, not a target: {comparison}: {'yes' if holds else 'no'} on the means "
              f"({count} of {n} seeds)")
    mean_diag = {k: sum(d[k] for d in diagnostics) / n for k in diagnostics[0]}
    print(f"- diagnostics (means): target probability clean {mean_diag['clean']:.3f}, object only "
          f"{mean_diag['object_only']:.3f}, object removed {mean_diag['object_removed']:.3f}; "
          f"{mean_diag['masks']:.1f} merged masks per image, {mean_diag['positive']:.2f} of them positive at "
          f"S3WM's first stage (noise-free); best single mask's IoU with the object {mean_diag['best_mask_iou']:.3f}; "
          f"merged masks identical to float64 distances' on {mean_diag['same_merges']:.3f} of the images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and images, for a smoke run")
    parser.add_argument("--family", choices=["texture", "shape"], default="texture")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--count", type=int, default=None, help="validation images explained")
    parser.add_argument("--depth", type=int, default=EXAMPLE_VIT["depth"], help="blocks of the ViT")
    parser.add_argument("--embed-dim", type=int, default=EXAMPLE_VIT["embed_dim"], help="width of the ViT")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one model trained (and its data generated) per seed; the summary averages them")
    parser.add_argument("--save", default=None, help="also write the seeds' tables and diagnostics to this JSON file")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="print the summary of runs saved with --save (seeds run in separate processes)")
    args = parser.parse_args()
    if args.merge:
        saved = [json.loads(Path(path).read_text()) for path in args.merge]
        summary([run for s in saved for run in s["runs"]], [d for s in saved for d in s["diagnostics"]])
        return
    epochs = args.epochs or (3 if args.quick else 12)
    count = args.count or (16 if args.quick else 128)
    runs, diagnostics = [], []
    for seed in args.seeds:
        print(f"\n# Seed {seed}")
        torch.manual_seed(seed)
        module, data = train(args.family, epochs, 1024 if args.quick else 3072, seed=seed, lr=args.lr,
                             depth=args.depth, embed_dim=args.embed_dim)
        runs.append(quality_table(module, data, count))
        diagnostics.append(mask_diagnostics(module, data, count))
    if args.save:
        Path(args.save).write_text(json.dumps({"args": vars(args), "runs": runs, "diagnostics": diagnostics}))
    summary(runs, diagnostics)


if __name__ == "__main__":
    main()
