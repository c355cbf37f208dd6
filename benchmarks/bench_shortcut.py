"""Does the shortcut alarm fire on models that learn a spurious cue, and stay silent on models that do not?

Trains the example's small ViT (texture family, 32 px, patch 4, ``SMALL_VIT``) once per seed and data kind:

- ``cue``: a class-coloured mark in the top-left corner on 90 % of the training *and* validation images;
- ``clean``: the same images without the mark;
- ``centred``: clean images whose objects all sit at the centre (one shared place, but no cue).

After every validation epoch it explains the same validation probes with the functional API
(``lightning_xai.explain``, targets = the prediction) and prints, per method, the shortcut statistic
(``docs/methods.md``, "Shortcut statistic") on the first 8 probes (the callback's default) and on all of
them, the share of map energy on the cue's patch and inside the object (ground truth the statistic does not
see), and the probe accuracy. Each run ends with its validation accuracy, its accuracy on the cue-free test
split, and the epoch at which the alarm (default threshold and patience) fired; the summary checks that it
fired on every cue run and on no other, and prints the margins between the kinds:

    python benchmarks/bench_shortcut.py                       # 3 seeds x 3 kinds, gradtoken
    python benchmarks/bench_shortcut.py --methods gradtoken c2f
    python benchmarks/bench_shortcut.py --quick               # one seed, few images, a smoke run
    python benchmarks/bench_shortcut.py --seeds 1 --save s1.pt    # runs can be split over processes ...
    python benchmarks/bench_shortcut.py --load s0.pt s1.pt s2.pt  # ... and summarised together
"""

from __future__ import annotations

import argparse
import math
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

import lightning_xai as lx
from lightning_xai.callbacks.shortcut import (
    DEFAULT_FRACTION,
    DEFAULT_PATIENCE,
    DEFAULT_THRESHOLD,
    ShortcutAlarm,
    object_drift,
    object_share,
    shortcut_score,
)
from lightning_xai.demos import SMALL_VIT, SyntheticDataModule, ViTClassifier, cue_region

KINDS: dict[str, dict] = {
    "cue": dict(cue_probability=0.9),
    "clean": dict(),
    "centred": dict(placement="centre"),
}
EXAMPLE_VIT = dict(model_name="vit_tiny_patch16_224", image_size=32, **SMALL_VIT)


class ProbeRecorder(pl.Callback):
    """After each validation epoch, explain the probes with each method and keep the per-epoch figures."""

    def __init__(self, images, labels, masks, methods, default_probes: int = 8):
        self.images, self.labels, self.masks, self.methods = images, labels, masks, methods
        self.default_probes = default_probes
        cue = cue_region(tuple(images.shape[-2:]))
        # the cue's patch cells (patch 4): the maps are patch-level, so score the cells the mark touches
        patch = SMALL_VIT["patch_size"]
        cells = F.max_pool2d(cue[None, None].float(), patch)  # (1, 1, h, w)
        self.cue_cells = F.interpolate(cells, scale_factor=patch)[0, 0].bool()
        self.rows: dict[str, list[dict]] = {m: [] for m in methods}
        self.saved: dict[str, list[dict]] = {}  # per method and epoch: maps (P, H, W) float16, classes (P,)

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        for method in self.methods:
            result = lx.explain(module, self.images, method=method)
            predicted = result.targets[:, 0]
            few = shortcut_score(result.maps[: self.default_probes], predicted[: self.default_probes])
            full = shortcut_score(result.maps, predicted)
            row = dict(epoch=epoch, score=few.score, score_all=full.score,
                       cue_share=float(object_share(result.maps, self.cue_cells.expand(len(self.images), -1, -1))
                                       .mean()),
                       object_share=float(object_share(result.maps, self.masks).mean()),
                       probe_acc=float((predicted == self.labels).float().mean()),
                       region_on_cue=float((full.region & self.cue_cells).sum() / full.region.sum()))
            self.rows[method].append(row)
            self.saved.setdefault(method, []).append(dict(maps=result.maps[:, 0].half(), classes=predicted))
            print(f"  {method:9s} epoch {epoch:2d}  statistic {row['score']:.3f} (8 probes) "
                  f"{row['score_all']:.3f} ({len(self.images)} probes)  energy on cue patch "
                  f"{row['cue_share']:.3f}  in object {row['object_share']:.3f}  agreed region on cue "
                  f"{row['region_on_cue']:.2f}  probe acc {row['probe_acc']:.2f}", flush=True)


def accuracy(module: ViTClassifier, dataset, count: int) -> float:
    images, labels, _ = dataset.batch(range(min(count, len(dataset))))
    with torch.no_grad():
        return float((module(images).argmax(-1) == labels).float().mean())


def run(kind: str, seed: int, epochs: int, num_train: int, num_probes: int, methods: list[str]) -> dict:
    """Train one model on ``kind`` data; return per-method per-epoch rows, accuracies and alarm epochs."""
    print(f"\n# {kind}, seed {seed}", flush=True)
    pl.seed_everything(seed, workers=True)
    data = SyntheticDataModule(family="texture", num_classes=4, image_size=32, num_train=num_train, num_val=512,
                               batch_size=64, seed=seed, val_return_mask=True, num_test=512, **KINDS[kind])
    data.setup("fit")
    generator = torch.Generator().manual_seed(1000 + seed)  # the probes: a seeded draw from validation
    indices = torch.randperm(len(data.val_set), generator=generator)[:num_probes]
    images, labels, masks = data.val_set.batch(indices)
    recorder = ProbeRecorder(images, labels, masks, methods)
    module = ViTClassifier(num_classes=4, lr=2e-3, warmup_epochs=1, **EXAMPLE_VIT)
    start = time.perf_counter()
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               callbacks=[recorder]).fit(module, datamodule=data)
    module.eval()
    out = dict(kind=kind, seed=seed, rows=recorder.rows, val_acc=accuracy(module, data.val_set, 512),
               test_acc=accuracy(module, data.test_set, 512), minutes=(time.perf_counter() - start) / 60,
               maps=recorder.saved, labels=labels, masks=masks)
    out["alarm"] = {method: alarm_epoch(rows) for method, rows in recorder.rows.items()}
    alarms = ", ".join(f"{m}: {'epoch ' + str(e) if e is not None else 'silent'}" for m, e in out["alarm"].items())
    print(f"  -> val accuracy {out['val_acc']:.3f}, cue-free test accuracy {out['test_acc']:.3f}; alarm {alarms}; "
          f"{out['minutes']:.1f} min", flush=True)
    return out


def alarm_epoch(rows: list[dict], threshold: float = DEFAULT_THRESHOLD, patience: int = DEFAULT_PATIENCE):
    """The epoch at which the alarm fires on a run's per-epoch statistic (8 probes), or ``None``."""
    alarm = ShortcutAlarm("method", threshold, patience)
    fired = [row["epoch"] for row in rows if alarm.update(row["epoch"], row["score"]) is not None]
    return fired[0] if fired else None


def held_level(scores: list[float], patience: int = DEFAULT_PATIENCE) -> float:
    """The highest level the statistic held for ``patience`` consecutive epochs (max over windows of the min)."""
    windows = [scores[i:i + patience] for i in range(len(scores) - patience + 1)]
    levels = [min(w) for w in windows if not any(math.isnan(v) for v in w)]
    return max(levels, default=math.nan)


def summary(results: list[dict], methods: list[str]) -> None:
    print(f"\n## Shortcut statistic per run (threshold {DEFAULT_THRESHOLD}, patience {DEFAULT_PATIENCE}, region "
          f"{DEFAULT_FRACTION:.0%} of the pixels = chance level)\n")
    print("| data | seed | method | statistic per epoch (8 probes) | max | max (all probes) | alarm at epoch | "
          "energy in object per epoch | object drift max | val acc | cue-free test acc |")
    print("|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in results:
        for method in methods:
            scores = [row["score"] for row in r["rows"][method]]
            finite = [s for s in scores if not math.isnan(s)]
            fired = alarm_epoch(r["rows"][method])  # recomputed: runs may have been saved with other defaults
            everything = [row["score_all"] for row in r["rows"][method] if not math.isnan(row["score_all"])]
            inside = " ".join(f"{row['object_share']:.2f}" for row in r["rows"][method])
            drift = object_drift(torch.tensor([row["object_share"] for row in r["rows"][method]]),
                                 torch.tensor([row["probe_acc"] for row in r["rows"][method]]))
            print(f"| {r['kind']} | {r['seed']} | {method} | {' '.join(f'{s:.2f}' for s in scores)} | "
                  f"{max(finite) if finite else math.nan:.3f} | {max(everything) if everything else math.nan:.3f} | "
                  f"{'-' if fired is None else fired} | {inside} | {float(drift.max()):.2f} | {r['val_acc']:.3f} | "
                  f"{r['test_acc']:.3f} |")
    print()
    for method in methods:
        cue = [r for r in results if r["kind"] == "cue"]
        other = [r for r in results if r["kind"] != "cue"]
        hits = sum(alarm_epoch(r["rows"][method]) is not None for r in cue)
        false = sum(alarm_epoch(r["rows"][method]) is not None for r in other)
        # margins: the level each run held for ``patience`` consecutive epochs (what the alarm needs), the
        # highest among clean/centred runs against the lowest among cue runs; and single epochs
        held_other = max(held_level([row["score"] for row in r["rows"][method]]) for r in other)
        held_cue = min(held_level([row["score"] for row in r["rows"][method]]) for r in cue)
        single = max((row["score"] for r in other for row in r["rows"][method] if not math.isnan(row["score"])),
                     default=math.nan)
        print(f"- {method}: alarm on {hits} of {len(cue)} cue runs and {false} of {len(other)} clean/centred runs "
              f"({'holds' if hits == len(cue) and false == 0 else 'FAILS'}); level held for {DEFAULT_PATIENCE} "
              f"epochs: highest clean/centred {held_other:.3f}, lowest cue {held_cue:.3f}; highest single "
              f"clean/centred epoch {single:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--methods", nargs="+", default=["gradtoken"])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--probes", type=int, default=32, help="validation probes explained (statistic on 8 too)")
    parser.add_argument("--quick", action="store_true", help="one seed, 1024 images, 3 epochs")
    parser.add_argument("--save", default=None, help="also save every run's per-epoch probe maps here (torch.save)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, oversubscribed CPU two threads ran 8x slower)")
    parser.add_argument("--load", nargs="+", default=None, help="summarise runs saved with --save; train nothing")
    args = parser.parse_args()
    if args.load:
        results = [r for path in args.load for r in torch.load(path, weights_only=False)]
        summary(results, [m for m in args.methods if all(m in r["rows"] for r in results)])
        return
    torch.set_num_threads(args.threads)
    seeds = args.seeds[:1] if args.quick else args.seeds
    epochs = args.epochs or (3 if args.quick else 8)
    num_train = args.num_train or (1024 if args.quick else 3072)
    results = []
    for seed in seeds:
        for kind in args.kinds:
            results.append(run(kind, seed, epochs, num_train, args.probes, args.methods))
            if args.save:
                torch.save(results, args.save)
    summary(results, args.methods)


if __name__ == "__main__":
    main()
