"""Quality of each method's maps on the example model: localisation, faithfulness, class discrimination.

Trains the example's small ViT (``examples/train_vit.py`` defaults: texture family, 32 px, patch 4) on the
generated data, then explains held-out images with known object masks and prints one Markdown table row per
method:

    python benchmarks/bench_quality.py              # about 4 minutes on 2 CPU cores
    python benchmarks/bench_quality.py --quick      # fewer images and epochs, for a smoke run
    python benchmarks/bench_quality.py --depth 6 --lr 1e-3   # a deeper model (6 blocks instead of 4)

Columns: IoU at the map mean, pointing game and energy inside the object (localisation against the mask),
deletion/insertion AUC (RISE-style, blur baseline; deletion lower is better, insertion higher), class
discrimination (two-object images: share of each class's map on its own object; 0.5 = cannot tell), model
evaluations and time per image. ViT-CX and C2F share their masks and noise seed.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch

import lightning_xai as lx
from lightning_xai.data import SyntheticDataModule, TwoObjectImages
from lightning_xai.demo import SMALL_VIT, ViTClassifier
from lightning_xai.metrics import class_discrimination, deletion_insertion, localization

ROWS: list[tuple[str, dict]] = [
    ("raw_attention", {}),
    ("rollout", {}),
    ("gae", {}),
    ("gradtoken", {}),
    ("vitcx", {}),
    ("c2f", {}),
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
        label = method + (f" ({options['granularity']})" if options else "")
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


def check_claims(results: list[dict]) -> None:
    """Print whether the claims the README makes hold in this run."""
    by = {r["method"]: r for r in results}
    claims = {
        "GradToken beats raw attention and rollout (IoU and energy)": all(
            by["gradtoken"][k] > by[b][k] for b in ("raw_attention", "rollout") for k in ("iou", "energy")),
        "C2F beats raw attention and rollout (IoU and energy)": all(
            by["c2f"][k] > by[b][k] for b in ("raw_attention", "rollout") for k in ("iou", "energy")),
        "C2F beats ViT-CX (IoU and energy)": all(by["c2f"][k] > by["vitcx"][k] for k in ("iou", "energy")),
        "C2F (draws) at most 2x ViT-CX's evaluations": by["c2f"]["evaluations"] <= 2 * by["vitcx"]["evaluations"],
        "C2F (clusters) fewer evaluations than ViT-CX": by["c2f (clusters)"]["evaluations"]
        < by["vitcx"]["evaluations"],
    }
    print()
    for claim, holds in claims.items():
        print(f"- {'holds' if holds else 'FAILS'}: {claim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and images, for a smoke run")
    parser.add_argument("--family", choices=["texture", "shape"], default="texture")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--count", type=int, default=None, help="validation images explained")
    parser.add_argument("--depth", type=int, default=EXAMPLE_VIT["depth"], help="blocks of the ViT")
    parser.add_argument("--embed-dim", type=int, default=EXAMPLE_VIT["embed_dim"], help="width of the ViT")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    args = parser.parse_args()
    epochs = args.epochs or (3 if args.quick else 12)
    count = args.count or (16 if args.quick else 128)
    torch.manual_seed(0)
    module, data = train(args.family, epochs, 1024 if args.quick else 3072, lr=args.lr, depth=args.depth,
                         embed_dim=args.embed_dim)
    check_claims(quality_table(module, data, count))


if __name__ == "__main__":
    main()
