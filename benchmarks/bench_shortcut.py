"""Does the shortcut alarm fire on models that follow a spurious cue, soon after the damage starts, and stay
silent on models that do not?

Trains the example's small ViT (texture family, 4 classes, 32 px, patch 4, ``SMALL_VIT``) once per seed and data
kind. Cue kinds (``SyntheticDataModule(cue_kind=..., cue_probability=...)``, on training *and* validation
images): ``colour90``/``colour50`` (a class-coloured mark in the top-left corner on 90 % / 50 % of the images),
``position90``/``position50`` (a white mark whose place along the top edge encodes the class), ``texture90``
(a black-and-white patch whose pattern encodes the class, bottom-right corner). Clean kinds: ``clean`` (objects
anywhere), ``centred`` (every object at the centre: one shared place, no cue), ``busy`` (many distractors,
pieces of random classes' objects among them).

After every validation epoch it explains the same validation probes (targets = the prediction, as the
callback's default) and records, per method: the transplant rate (``docs/methods.md``, "Shortcut statistic")
on the first 8 probes (the callback's default count) and on all of them, at several region sizes (the rate that
follows the donor at its place only, the raw rate, and the moved-region control's); the auxiliary agreement
statistic; and the damage, measured directly on 256 validation
images rendered without the cue, with their own class's cue and with the next class's cue:
``damage = accuracy without cue - accuracy with another class's cue``. A run *follows the cue* when its final
accuracy with another class's cue is below 0.5. The summary judges the alarm (threshold, patience) on every run:
it must fire on every run that follows the cue, within one explained epoch of the damage passing 0.10, and on
no clean run; the lag is ``alarm epoch - first epoch with damage >= 0.10``.

    python benchmarks/bench_shortcut.py --kinds colour90 --seeds 0 --json out/colour90_0.json   # one run
    python benchmarks/bench_shortcut.py --load out/*.json              # summarise saved runs, train nothing
    python benchmarks/bench_shortcut.py --quick                        # one seed, one cue and one clean kind

Each run took 10-16 minutes with one thread on a shared, busy 2-core machine (GradToken and C2F); run (kind, seed)
pairs as separate processes (``OMP_NUM_THREADS=1 nice``) and merge their JSON with ``--load``.

Faster, to compare statistics: ``--save FOLDER`` trains without explaining (the damage per epoch, each epoch's
weights, the probes and the damage images under ``FOLDER/<kind>_<seed>/``; 0.6-1.9 minutes a run on the same
machine, the same weights as a run with the recorder), then ``benchmarks/eval_shortcut.py FOLDER/*/ --results
benchmarks/results/shortcut`` explains and checks every saved epoch and writes the runs that ``--load`` reads:

    python benchmarks/bench_shortcut.py --save /tmp/sc_ckpt                # 8 kinds x 3 seeds, weights only
    python benchmarks/eval_shortcut.py /tmp/sc_ckpt/*/ --results benchmarks/results/shortcut
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

import lightning_xai as lx
from lightning_xai.demos import SMALL_VIT, SyntheticDataModule, SyntheticObjects, ViTClassifier, add_cue
from lightning_xai.shortcut import (
    DEFAULT_PATIENCE,
    DEFAULT_PATIENCE_WITH_REFERENCES,
    DEFAULT_REGION,
    DEFAULT_THRESHOLD,
    ShortcutAlarm,
    shortcut_score,
    transplant_check,
)

KINDS: dict[str, dict] = {
    "colour90": dict(cue_kind="colour", cue_probability=0.9),
    "colour50": dict(cue_kind="colour", cue_probability=0.5),
    "position90": dict(cue_kind="position", cue_probability=0.9),
    "position50": dict(cue_kind="position", cue_probability=0.5),
    "texture90": dict(cue_kind="texture", cue_probability=0.9),
    "clean": dict(),
    "centred": dict(placement="centre"),
    "busy": dict(background="busy"),
}
REGIONS = (0.02, 0.04, 0.08)
NUM_CLASSES = 4
DAMAGE_LEVEL = 0.10
EXAMPLE_VIT = dict(model_name="vit_tiny_patch16_224", image_size=32, **SMALL_VIT)


def is_cue(kind: str) -> bool:
    return "cue_probability" in KINDS[kind]


def datamodule(kind: str, seed: int, num_train: int, num_classes: int = NUM_CLASSES) -> SyntheticDataModule:
    """The data of one (kind, seed) run, set up for ``fit`` (``eval_callback_alarm.py`` rebuilds a saved run's)."""
    options = dict(KINDS[kind])
    options.setdefault("cue_kind", "colour")  # clean kinds: damage measured with the colour mark they never saw
    data = SyntheticDataModule(family="texture", num_classes=num_classes, image_size=32, num_train=num_train,
                               num_val=512, batch_size=64, seed=seed, num_test=256, **options)
    data.setup("fit")
    return data


def damage_images(data: SyntheticDataModule, count: int) -> dict[str, torch.Tensor]:
    """The same ``count`` validation images without the cue, with their own class's and with the next class's."""
    plain = SyntheticObjects(count, 32, data.family, data.num_classes, seed=data.seed, split="val",
                             placement=data.placement, background=data.background)
    images, labels, _ = plain.batch(range(count))
    kind = data.cue_kind
    return dict(labels=labels, none=images, own=add_cue(images, labels, kind),
                other=add_cue(images, (labels + 1) % data.num_classes, kind))


class ProbeRecorder(pl.Callback):
    """After each validation epoch: the transplant rates, the agreement statistic and the damage."""

    def __init__(self, probes: torch.Tensor, damage: dict, methods: list[str], default_probes: int = 8):
        self.probes, self.damage, self.methods, self.default_probes = probes, damage, methods, default_probes
        self.rows: dict[str, list[dict]] = {m: [] for m in methods}

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        was_training = module.training
        module.eval()
        with torch.no_grad():
            acc = {k: float((module(self.damage[k]).argmax(-1) == self.damage["labels"]).float().mean())
                   for k in ("none", "own", "other")}

        def predict(x):
            with torch.no_grad():
                return module(x)

        for method in self.methods:
            start = time.perf_counter()
            result = lx.explain(module, self.probes, method=method)
            explain_s = time.perf_counter() - start
            maps, classes = result.maps[:, 0], result.targets[:, 0]
            few = slice(0, self.default_probes)
            row = dict(epoch=epoch, acc_none=acc["none"], acc_own=acc["own"], acc_other=acc["other"],
                       damage=acc["none"] - acc["other"], explain_s=explain_s,
                       agreement=shortcut_score(maps[few], classes[few]).score,
                       classes8=len(set(classes[few].tolist())))
            start = time.perf_counter()
            for q in REGIONS:  # region sizes on the callback's 8 probes; all probes at the default size only
                small = transplant_check(predict, self.probes[few], maps[few], classes[few], q, control_all=True)
                row[f"rate8_{q}"], row[f"raw8_{q}"], row[f"control8_{q}"] = small.rate, small.raw_rate, \
                    small.control_rate
            row["transplant_s"] = (time.perf_counter() - start) / len(REGIONS)
            q = DEFAULT_REGION
            full = transplant_check(predict, self.probes, maps, classes, q, control_all=True)
            row[f"rate_{q}"], row[f"raw_{q}"], row[f"control_{q}"] = full.rate, full.raw_rate, full.control_rate
            self.rows[method].append(row)
            print(f"  {method:9s} ep {epoch}  rate8 " + " ".join(f"{row[f'rate8_{r}']:.2f}" for r in REGIONS)
                  + f"  raw8/ctrl8 {row[f'raw8_{q}']:.2f}/{row[f'control8_{q}']:.2f}  rate{len(self.probes)} "
                  + f"{row[f'rate_{q}']:.2f}  raw/ctrl {row[f'raw_{q}']:.2f}/{row[f'control_{q}']:.2f}"
                  + f"  agree {row['agreement']:.2f}  acc none/own/other {acc['none']:.2f}/{acc['own']:.2f}/"
                  f"{acc['other']:.2f}", flush=True)
        module.train(was_training)


class CheckpointSaver(pl.Callback):
    """After each validation epoch: the damage (accuracy without, with its own and with another class's cue) and
    the model's ``state_dict`` saved to ``folder/epoch{e}.pt``; no explanation in the loop (``--evaluate`` does
    that afterwards from the saved weights)."""

    def __init__(self, folder: Path, damage: dict):
        self.folder, self.damage, self.rows = folder, damage, []

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        was_training = module.training
        module.eval()
        with torch.no_grad():
            acc = {k: float((module(self.damage[k]).argmax(-1) == self.damage["labels"]).float().mean())
                   for k in ("none", "own", "other")}
        module.train(was_training)
        epoch = trainer.current_epoch
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, self.folder / f"epoch{epoch}.pt")
        self.rows.append(dict(epoch=epoch, acc_none=acc["none"], acc_own=acc["own"], acc_other=acc["other"],
                              damage=acc["none"] - acc["other"]))
        print(f"  ep {epoch}  acc none/own/other {acc['none']:.2f}/{acc['own']:.2f}/{acc['other']:.2f}", flush=True)


def run(kind: str, seed: int, epochs: int, num_train: int, num_probes: int, methods: list[str],
        save: Path | None = None, num_classes: int = NUM_CLASSES) -> dict:
    """Train one model on ``kind`` data; return its per-method per-epoch rows."""
    print(f"\n# {kind}, seed {seed}", flush=True)
    pl.seed_everything(seed, workers=True)
    data = datamodule(kind, seed, num_train, num_classes)
    generator = torch.Generator().manual_seed(1000 + seed)  # the probes: a seeded draw from validation
    indices = torch.randperm(len(data.val_set), generator=generator)[:num_probes]
    probes, _, _ = data.val_set.batch(indices)
    damage = damage_images(data, 256)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        recorder = CheckpointSaver(save, damage)
    else:
        recorder = ProbeRecorder(probes, damage, methods)
    module = ViTClassifier(num_classes=num_classes, lr=2e-3, warmup_epochs=1, **EXAMPLE_VIT)
    start = time.perf_counter()
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               callbacks=[recorder]).fit(module, datamodule=data)
    out = dict(kind=kind, seed=seed, cue=is_cue(kind), rows=recorder.rows, epochs=epochs, num_train=num_train,
               num_classes=num_classes, minutes=(time.perf_counter() - start) / 60)
    if save is not None:
        torch.save(dict(probes=probes, labels=data.val_set.batch(indices)[1], damage=damage), save / "probes.pt")
        (save / "run.json").write_text(json.dumps(out))
        print(f"  saved to {save} in {out['minutes']:.1f} min", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ judging


def alarm_epoch(rows: list[dict], key: str, threshold: float = DEFAULT_THRESHOLD,
                patience: int = DEFAULT_PATIENCE) -> int | None:
    """The epoch at which the alarm fires on a run's per-epoch ``key`` values, or ``None``."""
    alarm = ShortcutAlarm("method", threshold, patience)
    fired = [row["epoch"] for row in rows if alarm.update(row["epoch"], row[key]) is not None]
    return fired[0] if fired else None


def damage_epoch(rows: list[dict], level: float = DAMAGE_LEVEL) -> int | None:
    """The first epoch whose damage is at least ``level``, or ``None``."""
    return next((row["epoch"] for row in rows if row["damage"] >= level), None)


def follows_cue(rows: list[dict]) -> bool:
    """The final model follows the cue: accuracy with another class's cue below 0.5."""
    return rows[-1]["acc_other"] < 0.5


def judge(results: list[dict], method: str, key: str, threshold: float, patience: int) -> dict:
    """Hits (cue runs that follow the cue and fired within one epoch of the damage), misses, false alarms."""
    out = dict(hits=0, followers=0, late=[], missed=[], false=[], lags=[])
    for r in results:
        rows = r["rows"][method]
        fired = alarm_epoch(rows, key, threshold, patience)
        if not r["cue"]:
            if fired is not None:
                out["false"].append(f"{r['kind']}/{r['seed']}")
            continue
        if not follows_cue(rows):
            continue
        out["followers"] += 1
        damaged = damage_epoch(rows)
        if fired is None:
            out["missed"].append(f"{r['kind']}/{r['seed']}")
            continue
        lag = fired - (damaged if damaged is not None else fired)
        out["lags"].append(lag)
        if lag <= 1:
            out["hits"] += 1
        else:
            out["late"].append(f"{r['kind']}/{r['seed']}")
    out["holds"] = out["hits"] == out["followers"] and not out["false"]
    return out


def fmt(values: list[float]) -> str:
    return " ".join("nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}" for v in values)


def with_carriers(results: list[dict], method: str) -> bool:
    """Add ``alarm8`` to every row of ``method`` when the runs hold ``carriers8`` (``eval_shortcut.py
    --add-carriers``): what the callback's alarm counts with labelled references, 1 when a probe is a stamped
    carrier and 0 otherwise (``nan`` without pairs), judged at any threshold in (0, 1]. Returns whether they did."""
    rows = [row for r in results for row in r["rows"][method]]
    if not rows or not all("carriers8" in row for row in rows):
        return False
    for row in rows:
        rate, share = row[f"rate8_{DEFAULT_REGION}"], row["carriers8"]
        row["alarm8"] = math.nan if math.isnan(rate) else float(share is not None and share > 0)
    return True


def summary(results: list[dict], methods: list[str], threshold: float = DEFAULT_THRESHOLD,
            patience: int = DEFAULT_PATIENCE) -> None:
    results = sorted(results, key=lambda r: (list(KINDS).index(r["kind"]), r["seed"]))
    for method in methods:
        key, rule_patience = f"rate8_{DEFAULT_REGION}", patience
        if with_carriers(results, method):  # the callback's rule with references: carriers gate, patience 1
            key, rule_patience = "alarm8", DEFAULT_PATIENCE_WITH_REFERENCES
        print(f"\n## {method}: transplant rate per epoch (8 probes, region {DEFAULT_REGION:.0%}), threshold "
              f"{threshold}, patience {rule_patience}"
              f"{'; with references an event counts when a probe is a stamped carrier' if key == 'alarm8' else ''}\n")
        print("| data | seed | rate per epoch | stamped carriers (share of the 8) | raw rate | control | agreement | "
              "damage per epoch | acc with other cue (end) | follows | damage >= 0.1 at | alarm at | lag |")
        print("|---|---:|---|---|---|---|---|---|---:|---|---:|---:|---:|")
        for r in results:
            rows = r["rows"][method]
            fired, damaged = alarm_epoch(rows, key, threshold, rule_patience), damage_epoch(rows)
            lag = "-" if fired is None or damaged is None else str(fired - damaged)
            print(f"| {r['kind']} | {r['seed']} | {fmt([row[f'rate8_{DEFAULT_REGION}'] for row in rows])} | "
                  f"{fmt([row.get('carriers8') for row in rows])} | "
                  f"{fmt([row[f'raw8_{DEFAULT_REGION}'] for row in rows])} | "
                  f"{fmt([row[f'control8_{DEFAULT_REGION}'] for row in rows])} | "
                  f"{fmt([row['agreement'] for row in rows])} | {fmt([row['damage'] for row in rows])} | "
                  f"{rows[-1]['acc_other']:.2f} | {'yes' if r['cue'] and follows_cue(rows) else 'no'} | "
                  f"{'-' if damaged is None else damaged} | {'-' if fired is None else fired} | {lag} |")
        print(f"\n### {method}: the alarm judged at other settings (8 probes unless 'all')\n")
        print("| region | probes | threshold | patience | hits / followers | missed | late | false alarms | "
              "highest clean rate | lowest follower rate after damage |")
        print("|---:|---|---:|---:|---|---|---|---|---:|---:|")
        for q in REGIONS:
            settings = (("8", "rate8_"), ("8 raw", "raw8_"), ("8 recurrence", "recur8_")) + (
                (("all", "rate_"), ("all raw", "raw_"), ("all recurrence", "recur_")) if q == DEFAULT_REGION else ())
            settings = tuple((n, k) for n, k in settings if all(f"{k}{q}" in row for r in results
                                                                 for row in r["rows"][method]))
            for probes, prefix in settings:
                k = f"{prefix}{q}"
                clean = [row[k] for r in results if not r["cue"] for row in r["rows"][method]
                         if not math.isnan(row[k])]
                after = []
                for r in results:
                    rows = r["rows"][method]
                    if r["cue"] and follows_cue(rows) and damage_epoch(rows) is not None:
                        after += [row[k] for row in rows if row["epoch"] >= damage_epoch(rows) + 1]
                for t in (0.15, 0.2, 0.25, 0.3):
                    for p in (1, 2):
                        j = judge(results, method, k, t, p)
                        print(f"| {q} | {probes} | {t} | {p} | {j['hits']} / {j['followers']} | "
                              f"{' '.join(j['missed']) or '-'} | {' '.join(j['late']) or '-'} | "
                              f"{' '.join(j['false']) or '-'} | {max(clean, default=math.nan):.2f} | "
                              f"{min((a for a in after if not math.isnan(a)), default=math.nan):.2f} |")
        if key == "alarm8":
            j = judge(results, method, key, threshold, rule_patience)
            print(f"\n- {method} (the callback's defaults with labelled references: a stamped carrier, patience "
                  f"{rule_patience}): alarm on {j['hits']} of {j['followers']} runs that follow the "
                  f"cue within one epoch of the damage (lags {j['lags']}); missed {j['missed']}, late {j['late']}; "
                  f"false alarms {j['false']} -> {'holds' if j['holds'] else 'FAILS'}")
        key = f"rate8_{DEFAULT_REGION}"
        j = judge(results, method, key, threshold, patience)
        print(f"\n- {method} (the rate alone, as without references, patience {patience}): alarm on {j['hits']} of "
              f"{j['followers']} runs that follow the cue within one "
              f"epoch of the damage (lags {j['lags']}); missed {j['missed']}, late {j['late']}; false alarms "
              f"{j['false']} -> {'holds' if j['holds'] else 'FAILS'}")
        if all(f"recur8_{DEFAULT_REGION}" in row for r in results for row in r["rows"][method]):
            j = judge(results, method, f"recur8_{DEFAULT_REGION}", threshold, patience)
            print(f"- {method} with recurrence=True: alarm on {j['hits']} of {j['followers']} within one epoch (lags "
                  f"{j['lags']}); missed {j['missed']}, late {j['late']}; false alarms {j['false']} -> "
                  f"{'holds' if j['holds'] else 'FAILS'}")
        times = [row["transplant_s"] for r in results for row in r["rows"][method]]
        print(f"- transplant check on 8 probes with its control: {sum(times) / max(1, len(times)) * 1000:.0f} ms "
              f"per check (one thread, shared CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--methods", nargs="+", default=["gradtoken"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=NUM_CLASSES, help="classes of the data (2..6)")
    parser.add_argument("--probes", type=int, default=32, help="validation probes explained (rates on 8 too)")
    parser.add_argument("--quick", action="store_true", help="one seed, colour90 and clean, 1024 images, 3 epochs")
    parser.add_argument("--json", default=None, help="save the runs here (JSON)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--load", nargs="+", default=None, help="summarise runs saved with --json; train nothing")
    parser.add_argument("--save", default=None, help="train without explaining: save each epoch's weights, the probes "
                        "and the damage images under SAVE/<kind>_<seed>/ (for --evaluate)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--patience", type=int, default=DEFAULT_PATIENCE)
    args = parser.parse_args()
    if args.load:
        results = [r for path in args.load for r in json.loads(Path(path).read_text())]
        summary(results, [m for m in args.methods if all(m in r["rows"] for r in results)], args.threshold,
                args.patience)
        return
    torch.set_num_threads(args.threads)
    seeds, kinds = (args.seeds[:1], ["colour90", "clean"]) if args.quick else (args.seeds, args.kinds)
    epochs, num_train = (3, 1024) if args.quick else (args.epochs, args.num_train)
    if args.save:
        args.json = None
    results = []
    for seed in seeds:
        for kind in kinds:
            save = Path(args.save) / f"{kind}_{seed}" if args.save else None
            results.append(run(kind, seed, epochs, num_train, args.probes, args.methods, save, args.classes))
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results))
    if not args.save:
        summary(results, args.methods, args.threshold, args.patience)


if __name__ == "__main__":
    main()
