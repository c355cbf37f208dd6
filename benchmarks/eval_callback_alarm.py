"""The shortcut alarm as the callback runs it with its defaults, judged on saved training runs.

``bench_shortcut.py --save FOLDER`` trains each (kind, seed) and keeps every epoch's weights and the damage. This
script replays each run's epochs through the callback's own shortcut watch
(:class:`~lightning_xai.callbacks.shortcut.ShortcutWatch`): the probes are drawn as ``ExplanationMonitor`` draws
them (``num_probes=8`` from the validation loader with ``seed``, and ``shortcut_references=24`` labelled samples
with ``seed + 1``), explained with ``lx.explain`` for their predicted class; a single-pass method also explains the
references, the extra donors of the carrier check (``ProbeRunner.explain_references``). The alarm fires as the
callback's does (default threshold and patience). The benchmark's rule: it must fire on every cue run whose model
follows the cue (final accuracy with another class's cue below 0.5) within one explained epoch of the damage passing
0.10 (``lag = alarm epoch - damage epoch <= 1``), and on no clean run. ``--seeds`` replays each run with several
probe draws (the callback's ``seed``), which is how a user's run varies.

    python benchmarks/bench_shortcut.py --save /tmp/sc_ckpt                 # 8 kinds x 3 seeds, weights only
    python benchmarks/eval_callback_alarm.py /tmp/sc_ckpt/*/ --seeds 0 1 2 --json out/alarm.json
    python benchmarks/eval_callback_alarm.py --load out/alarm.json          # judge saved rows again
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_shortcut import DAMAGE_LEVEL, EXAMPLE_VIT, NUM_CLASSES, datamodule, is_cue  # noqa: E402

import lightning_xai as lx  # noqa: E402
from lightning_xai.callbacks import shortcut as callback_shortcut  # noqa: E402
from lightning_xai.callbacks.batches import from_loader  # noqa: E402
from lightning_xai.callbacks.shortcut import ShortcutWatch  # noqa: E402
from lightning_xai.demos import ViTClassifier  # noqa: E402
from lightning_xai.explainers.registry import get_explainer  # noqa: E402
from lightning_xai.shortcut import transplant_check  # noqa: E402
from lightning_xai.shortcut.alarm import carriers_needed  # noqa: E402


def replay(folder: Path, method: str, seed: int, num_probes: int = 8, num_references: int = 24) -> dict:
    """One saved run through the callback's watch with probe draw ``seed``; per epoch the damage, the rate and
    the carriers (probes' and references')."""
    run = json.loads((folder / "run.json").read_text())
    num_classes = run.get("num_classes", NUM_CLASSES)
    data = datamodule(run["kind"], run["seed"], run["num_train"], num_classes)
    loader = data.val_dataloader()
    probes, references = from_loader(loader, num_probes, seed), from_loader(loader, num_references, seed + 1)
    watch = ShortcutWatch()
    watch.references = (torch.cat([probes.images, references.images]), torch.cat([probes.labels, references.labels]))
    module = ViTClassifier(num_classes=num_classes, lr=2e-3, warmup_epochs=1, **EXAMPLE_VIT)
    single_pass = get_explainer(method).single_pass
    rows = []
    for row in run["rows"]:
        module.load_state_dict(torch.load(folder / f"epoch{row['epoch']}.pt"))
        module.eval()

        def predict(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(images)

        result = lx.explain(module, probes.images, method)
        donors = None
        if single_pass:
            more = lx.explain(module, references.images, method)
            donors = (references.images, more.maps, more.targets)
        scalars = watch.update(method, row["epoch"], probes.images, result.maps, result.targets, predict, donors)
        check = watch.checks[method]
        pasted = check.carrier.rates[~check.carrier.rates.isnan()] if check.carrier is not None else torch.zeros(0)
        rows.append(dict(epoch=row["epoch"], damage=row["damage"], acc_other=row["acc_other"],
                         rate=scalars.get("shortcut_rate", float("nan")), probe_carriers=check.carrier_probes(),
                         reference_carriers=check.extra_carriers(), fired=method in watch.alarms,
                         stamp_rates=[round(float(r), 4) for r in pasted],
                         donors=len(probes.images) + (0 if donors is None else len(donors[0]))))
    return dict(kind=run["kind"], seed=run["seed"], draw=seed, method=method, cue=is_cue(run["kind"]),
                num_classes=num_classes, rows=rows)


def fires_at_level(row: dict, level: float) -> bool:
    """Whether ``row``'s event would count with carrier level ``level`` (patience 1): at least
    ``carriers_needed(donors)`` stamped donors whose rate reaches ``level``."""
    return sum(r >= level for r in row["stamp_rates"]) >= carriers_needed(row["donors"])


def verdict(result: dict, level: float | None = None) -> tuple[str, int | None]:
    """``("on time" | "late" | "missed" | "false alarm" | "silent" | "not following", lag)``; ``level``: judge the
    alarm with this carrier level instead of the one the replay ran with (rows saved with their stamps' rates)."""
    rows = result["rows"]
    if level is None:
        fired = next((r["epoch"] for r in rows if r["fired"]), None)
    else:
        fired = next((r["epoch"] for r in rows if fires_at_level(r, level)), None)
    if not result["cue"]:
        return ("false alarm" if fired is not None else "silent"), None
    if rows[-1]["acc_other"] >= 0.5:
        return "not following", None
    damage = next((r["epoch"] for r in rows if r["damage"] >= DAMAGE_LEVEL), None)
    if fired is None:
        return "missed", None
    lag = fired - damage if damage is not None else None
    return ("late" if lag is not None and lag > 1 else "on time"), lag


def summary(results: list[dict], level: float | None = None) -> None:
    for method in sorted({r["method"] for r in results}):
        print(f"\n## {method}: the callback's alarm (defaults), per run and probe draw")
        counts: dict[str, int] = {}
        lags = []
        for result in sorted((r for r in results if r["method"] == method),
                             key=lambda r: (r["kind"], r["seed"], r["draw"])):
            what, lag = verdict(result, level)
            counts[what] = counts.get(what, 0) + 1
            lags += [] if lag is None else [lag]
            carriers = [len(r["probe_carriers"] or []) + len(r["reference_carriers"] or []) if level is None
                        else sum(v >= level for v in r["stamp_rates"]) for r in result["rows"]]
            damage = [round(r["damage"], 2) for r in result["rows"]]
            print(f"{result['kind']:>11}/{result['seed']} draw {result['draw']}: {what:<13} lag {lag!s:>4}  "
                  f"carriers per epoch {carriers}  damage {damage}")
        cue = sum(counts.get(k, 0) for k in ("on time", "late", "missed"))
        clean = counts.get("false alarm", 0) + counts.get("silent", 0)
        print(f"-> cue-following runs on time: {counts.get('on time', 0)}/{cue} (late {counts.get('late', 0)}, "
              f"missed {counts.get('missed', 0)}; lags {min(lags, default=None)}..{max(lags, default=None)}); "
              f"false alarms: {counts.get('false alarm', 0)}/{clean} clean runs; not following: "
              f"{counts.get('not following', 0)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", help="run folders saved by bench_shortcut.py --save")
    parser.add_argument("--methods", nargs="+", default=["gradtoken"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the callback's probe-draw seeds")
    parser.add_argument("--json", default=None, help="save the replayed runs here")
    parser.add_argument("--load", nargs="+", default=None, help="judge runs saved with --json")
    parser.add_argument("--references", type=int, default=24, help="the callback's shortcut_references")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--level", type=float, default=None, help="judge saved rows (--load) with this carrier level "
                        "(sensitivity; default: as replayed, the library's)")
    parser.add_argument("--stamp-margin", type=float, default=None, help="the stamp test's margin (sensitivity; "
                        "default: the library's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stamp_margin is not None:  # the watch calls transplant_check with the library's default margin
        callback_shortcut.transplant_check = functools.partial(transplant_check, stamp_margin=args.stamp_margin)
    if args.load:
        results = [r for path in args.load for r in json.loads(Path(path).read_text())]
    else:
        results = []
        for folder in args.folders:
            for method in args.methods:
                for seed in args.seeds:
                    results.append(replay(Path(folder), method, seed, num_references=args.references))
                    print(f"{Path(folder).name} {method} draw {seed}: {verdict(results[-1])[0]}", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results))
    summary(results, args.level)


if __name__ == "__main__":
    main()
