"""Judge candidate shortcut statistics on saved training runs, in minutes instead of hours.

``bench_shortcut.py --save FOLDER`` trains each (kind, seed) without explaining and keeps every epoch's weights,
the probes and the damage images under ``FOLDER/<kind>_<seed>/``. This script loads them, explains the probes
with ``lx.explain`` at every epoch, computes each candidate statistic on the callback's 8 probes (and on all
probes), and judges the alarm on every candidate exactly as ``bench_shortcut.py``'s summary does (threshold,
patience; fires on every cue-following run within one explained epoch of the damage passing 0.10, and on no
clean run).

    python benchmarks/eval_shortcut.py /work/sc_ckpt/*/ --json out/eval.json   # evaluate and save the rows
    python benchmarks/eval_shortcut.py --load out/eval.json                    # judge saved rows again

Candidates (each a share of the pairs ``(i, j)``: donor ``i``'s region ``R_i`` pasted into recipient ``j``):

- ``old``: ``j`` becomes ``c_i`` with ``R_i`` pasted at its place and not with it moved elsewhere (round 1);
- ``occl_<fill>``: ``old`` and ``j`` keeps its own prediction when ``R_i`` of ``j`` is only filled with neutral
  content (``mean``: ``j``'s mean colour; ``self``: ``j``'s own pixels from another place; ``blur``: ``j``
  blurred) -- the donor *adds* its class rather than removes ``j``'s evidence;
- ``occlw_<fill>``: ``old`` and the neutral fill does not turn ``j`` into ``c_i``;
- ``conc``: ``old`` and the donor's next region (its top ``2q`` minus top ``q``) pasted at its place does not
  turn ``j`` into ``c_i`` -- the class sits in a small compact region;
- ``stamp1``, ``core``, ``half``, ``placed``: ``old`` and the donor's region recurs in another probe of its class
  (nearer than every probe of another class) over the whole region, its top quarter or half, or (``placed``) unless
  no probe of its class has its own region at that place;
- ``share<l>``/``sq<l>``: ``old`` and the region holds at least ``l`` of the donor map's (squared) energy.

Each row also holds what ``bench_shortcut.py --load`` summarises: the library's check as the callback runs it
(``rate8_<q>``, ``raw8_<q>``, ``control8_<q>``; ``rate_0.04`` on all probes), the same with
``recurrence=True`` (``recur8_<q>``, ``recur_0.04``), the agreement statistic and the damage; and
``carriers8``, the share of the 8 probes that are stamped carriers with all saved probes and their labels as the
references (``transplant_check(..., references=...)``): judge it with ``--keys carriers8 --threshold 0.01
--patience 1`` (one stamped carrier is the evidence).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_shortcut import EXAMPLE_VIT, KINDS, NUM_CLASSES, REGIONS, judge  # noqa: E402

import lightning_xai as lx  # noqa: E402
from lightning_xai.demos import ViTClassifier  # noqa: E402
from lightning_xai.shortcut import (  # noqa: E402
    DEFAULT_PATIENCE,
    DEFAULT_REGION,
    DEFAULT_THRESHOLD,
    paste,
    shortcut_score,
    top_regions,
    transplant_check,
    transplant_pairs,
)

FILLS = ("mean", "self", "blur")


def _forward(predict, parts: list[Tensor]) -> Tensor:
    return torch.cat([predict(p).float().softmax(-1) for p in parts]) if parts else torch.zeros(0, NUM_CLASSES)


@torch.no_grad()
def candidates(predict, images: Tensor, maps: Tensor, classes: Tensor, q: float, seed: int = 0,
               chunk: int = 256) -> dict[str, float]:
    """Every candidate's rate on probes ``images`` ``(B, C, H, W)`` with maps ``(B, H, W)`` for ``classes``."""
    regions = top_regions(maps, q)
    nxt = top_regions(maps, min(0.5, 2 * q)) & ~regions
    before = predict(images).float().softmax(-1)
    pred = before.argmax(-1)
    donors, recipients = transplant_pairs(classes, pred)
    m = len(donors)
    if m == 0:
        return {}
    height, width = images.shape[-2:]
    generator = torch.Generator().manual_seed(int(seed))
    low = torch.tensor([height // 4, width // 4])
    shifts = low + (torch.rand(m, 2, generator=generator) * (torch.tensor([height, width]) // 2 + 1)).long()
    whole = torch.ones_like(regions)
    mean = images.mean((-2, -1), keepdim=True).expand_as(images)
    blurred = F.avg_pool2d(images, 7, 1, 3, count_include_pad=False)
    out: dict[str, list[Tensor]] = {k: [] for k in ("after", "moved", "next", *FILLS)}
    for start in range(0, m, chunk):
        d, r, s = donors[start:start + chunk], recipients[start:start + chunk], shifts[start:start + chunk]
        mask = regions[d][:, None]
        base = images[r]
        out["after"].append(paste(images, regions, d, r))
        out["moved"].append(paste(images, regions, d, r, s))
        out["next"].append(paste(images, nxt, d, r))
        out["mean"].append(torch.where(mask, mean[r], base))
        out["self"].append(torch.where(mask, paste(images, whole, r, r, s), base))
        out["blur"].append(torch.where(mask, blurred[r], base))
    p = {k: _forward(predict, v).argmax(-1) for k, v in out.items()}
    c, own = classes[donors], pred[recipients]
    old = (p["after"] == c) & (p["moved"] != c)
    rates = dict(raw=(p["after"] == c), old=old, conc=old & (p["next"] != c), moved=(p["moved"] == c),
                 next=(p["next"] == c))
    for fill in FILLS:
        rates[f"occl_{fill}"] = old & (p[fill] == own)
        rates[f"occlw_{fill}"] = old & (p[fill] != c)
        rates[f"keep_{fill}"] = p[fill] == own
    flat = maps.flatten(1).float()
    mass = flat.clamp_min(0)
    share = (mass * regions.flatten(1)).sum(1) / mass.sum(1).clamp_min(1e-12)  # (B,) the region's share of the map
    squared = (flat**2 * regions.flatten(1)).sum(1) / (flat**2).sum(1).clamp_min(1e-12)
    overlap = (regions[donors] & regions[recipients]).flatten(1).sum(1).float() / regions[0].sum()
    for level in (0.3, 0.4, 0.5):
        rates[f"share{level}"] = old & (share[donors] >= level)
        rates[f"sq{level}"] = old & (squared[donors] >= level)
    rates["disj"] = old & (overlap < 0.5)
    # stamp: the region's pixels recur at the same place in another probe of the donor's class more closely than
    # in any probe of another class
    diff = (images[:, None] - images[None, :]).abs().mean(2)  # (B, B, H, W)
    r = regions.float()
    dist = (diff * r[:, None]).flatten(2).sum(-1) / r.flatten(1).sum(-1)[:, None]  # (B, B): over R_i
    same = (classes[:, None] == classes[None, :]) & ~torch.eye(len(classes), dtype=torch.bool)
    inf = torch.tensor(float("inf"))
    d_same = torch.where(same, dist, inf).min(1).values
    d_other = torch.where(classes[:, None] != classes[None, :], dist, inf).min(1).values
    stamp = d_same < 0.5 * d_other
    rates["stamp"] = old & stamp[donors]
    rates["stamp1"] = old & (d_same < d_other)[donors]
    for name, part in (("core", 0.25), ("half", 0.5)):  # recurrence judged on the top quarter/half of R_i
        core = top_regions(maps, q * part)
        rc = core.float()
        dist_c = (diff * rc[:, None]).flatten(2).sum(-1) / rc.flatten(1).sum(-1)[:, None]
        near_same = torch.where(same, dist_c, inf).min(1).values
        near_other = torch.where(classes[:, None] != classes[None, :], dist_c, inf).min(1).values
        rates[name] = old & (near_same < near_other)[donors]
    # a class-mate's evidence at the same place with other pixels: the place where the class's objects sit
    rf = regions.flatten(1).float()
    shared = (rf @ rf.T) / rf.sum(1, keepdim=True)  # (B, B): share of R_i inside R_k
    mates = same & (shared >= 0.5)
    rates["placed"] = old & ((d_same < d_other) | ~mates.any(1))[donors]
    rates["placed0"] = old & ((d_same < d_other) | ~(same & (shared > 0)).any(1))[donors]
    out_rates = {k: float(v.float().mean()) for k, v in rates.items()}
    out_rates["share_mean"], out_rates["sq_mean"] = float(share.mean()), float(squared.mean())
    hit = old.nonzero().flatten()
    out_rates["share_flip"] = float(share[donors[hit]].mean()) if len(hit) else math.nan
    out_rates["sq_flip"] = float(squared[donors[hit]].mean()) if len(hit) else math.nan
    out_rates["overlap_flip"] = float(overlap[hit].mean()) if len(hit) else math.nan
    return out_rates


def saved_run(folder: Path) -> tuple[dict, dict, ViTClassifier, Callable[[Tensor], Tensor]]:
    """A run saved by ``bench_shortcut.py --save``: its ``run.json``, its ``probes.pt`` (probes, labels, damage
    images), the example's model (load each ``epoch<k>.pt`` into it) and its forward without gradients."""
    module = ViTClassifier(num_classes=NUM_CLASSES, lr=2e-3, warmup_epochs=1, **EXAMPLE_VIT)
    module.eval()

    def predict(x: Tensor) -> Tensor:
        with torch.no_grad():
            return module(x)

    return json.loads((folder / "run.json").read_text()), torch.load(folder / "probes.pt"), module, predict


def evaluate(folder: Path, methods: list[str], probes8: int = 8) -> dict:
    """Explain the saved run's probes at every saved epoch and compute every candidate."""
    run, saved, module, predict = saved_run(folder)
    probes = saved["probes"]
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    for base in run["rows"]:
        epoch = base["epoch"]
        module.load_state_dict(torch.load(folder / f"epoch{epoch}.pt"))
        module.eval()
        for method in methods:
            result = lx.explain(module, probes, method=method)
            maps, classes = result.maps[:, 0], result.targets[:, 0].long()
            row = dict(base, classes8=len(set(classes[:probes8].tolist())))
            q = DEFAULT_REGION
            for k, v in candidates(predict, probes[:probes8], maps[:probes8], classes[:probes8], q).items():
                row[f"{k}8_{q}"] = v
            row["agreement"] = shortcut_score(maps[:probes8], classes[:probes8]).score
            start = time.perf_counter()
            for q in REGIONS:  # the library's check as the callback runs it, and round 1's (no recurrence)
                check = transplant_check(predict, probes[:probes8], maps[:probes8], classes[:probes8], q,
                                         control_all=True)
                row[f"rate8_{q}"], row[f"raw8_{q}"], row[f"control8_{q}"] = check.rate, check.raw_rate, \
                    check.control_rate
            row["transplant_s"] = (time.perf_counter() - start) / len(REGIONS)
            for q in REGIONS:
                row[f"recur8_{q}"] = transplant_check(predict, probes[:probes8], maps[:probes8], classes[:probes8],
                                                      q, recurrence=True).rate
            full = transplant_check(predict, probes, maps, classes, control_all=True)
            q = DEFAULT_REGION
            row[f"rate_{q}"], row[f"raw_{q}"], row[f"control_{q}"] = full.rate, full.raw_rate, full.control_rate
            row[f"recur_{q}"] = transplant_check(predict, probes, maps, classes, recurrence=True).rate
            # stamped carriers: the callback's 8 probes, with every saved probe and its label as the references
            stamped = transplant_check(predict, probes[:probes8], maps[:probes8], classes[:probes8],
                                       references=(probes, saved["labels"]))
            row["carriers8"] = stamped.carrier_share
            rows[method].append(row)
    return dict(kind=run["kind"], seed=run["seed"], cue=run["cue"], rows=rows, epochs=run["epochs"],
                num_train=run["num_train"])


def add_carriers(folder: Path, results: Path, methods: list[str], probes8: int = 8) -> None:
    """Fill ``carriers8`` (the callback's rule: the share of its 8 probes that are stamped carriers, with the saved
    probes and their labels as the references) into the saved results of ``folder``'s run, explaining the 8 probes
    as the callback does, without re-computing the other candidates."""
    run, saved, module, predict = saved_run(folder)
    path = results / f"{run['kind']}_{run['seed']}.json"
    saved_rows = json.loads(path.read_text())
    probes, labels = saved["probes"], saved["labels"]
    for base in run["rows"]:
        module.load_state_dict(torch.load(folder / f"epoch{base['epoch']}.pt"))
        module.eval()
        for method in methods:
            if method not in saved_rows[0]["rows"]:
                continue
            result = lx.explain(module, probes[:probes8], method=method)
            check = transplant_check(predict, probes[:probes8], result.maps[:, 0], result.targets[:, 0].long(),
                                     references=(probes, labels))
            row = next(r for r in saved_rows[0]["rows"][method] if r["epoch"] == base["epoch"])
            row["carriers8"] = check.carrier_share
    path.write_text(json.dumps(saved_rows))


def nan(v) -> float:
    return math.nan if v is None else v


def table(results: list[dict], method: str, keys: list[str], threshold: float, patience: int) -> None:
    """Per candidate: the judgement at the defaults and each run's per-epoch values."""
    results = sorted(results, key=lambda r: (list(KINDS).index(r["kind"]), r["seed"]))
    print(f"\n## {method}: candidates judged at threshold {threshold}, patience {patience} (8 probes)\n")
    print("| candidate | hits / followers | lags | missed | late | false alarms | max clean | min follower after "
          "damage+1 |")
    print("|---|---|---|---|---|---|---:|---:|")
    for key in keys:
        for r in results:
            for row in r["rows"][method]:
                row.setdefault(key, math.nan)
        j = judge(results, method, key, threshold, patience)
        clean = [nan(row[key]) for r in results if not r["cue"] for row in r["rows"][method]]
        after = []
        for r in results:
            rows = r["rows"][method]
            damaged = next((row["epoch"] for row in rows if row["damage"] >= 0.10), None)
            if r["cue"] and rows[-1]["acc_other"] < 0.5 and damaged is not None:
                after += [nan(row[key]) for row in rows if row["epoch"] >= damaged + 1]
        clean = [c for c in clean if not math.isnan(c)]
        after = [a for a in after if not math.isnan(a)]
        print(f"| {key} | {j['hits']} / {j['followers']} | {j['lags']} | {' '.join(j['missed']) or '-'} | "
              f"{' '.join(j['late']) or '-'} | {' '.join(j['false']) or '-'} | {max(clean, default=math.nan):.2f} | "
              f"{min(after, default=math.nan):.2f} |")


def fmt_damage(rows: list[dict]) -> str:
    return " ".join(f"{row['damage']:.2f}" for row in rows)


def per_run(results: list[dict], method: str, keys: list[str]) -> None:
    results = sorted(results, key=lambda r: (list(KINDS).index(r["kind"]), r["seed"]))
    print(f"\n## {method}: per run and epoch\n")
    print("| run | damage | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in results:
        rows = r["rows"][method]
        cells = [" ".join("  - " if math.isnan(nan(row.get(k))) else f"{row[k]:.2f}" for row in rows) for k in keys]
        print(f"| {r['kind']}_{r['seed']} | {fmt_damage(rows)} | "
              + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", help="run folders saved by bench_shortcut.py --save")
    parser.add_argument("--methods", nargs="+", default=["gradtoken"])
    parser.add_argument("--json", default=None, help="save the evaluated rows here")
    parser.add_argument("--load", nargs="+", default=None, help="judge rows saved with --json")
    parser.add_argument("--results", default=None, help="also write each run to RESULTS/<kind>_<seed>.json "
                        "(for bench_shortcut.py --load)")
    parser.add_argument("--keys", nargs="+", default=None, help="candidates to judge (default: all)")
    parser.add_argument("--show", nargs="+", default=[], help="candidates to print per run")
    parser.add_argument("--add-carriers", action="store_true", help="only fill carriers8 into the runs that "
                        "--results already holds (explaining the 8 probes of each saved epoch), then judge them")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--patience", type=int, default=DEFAULT_PATIENCE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.add_carriers:
        for folder in args.folders:
            start = time.perf_counter()
            add_carriers(Path(folder), Path(args.results), args.methods)
            print(f"added carriers8 to {folder} in {time.perf_counter() - start:.0f} s", flush=True)
        return
    if args.load:
        results = [r for path in args.load for r in json.loads(Path(path).read_text())]
    else:
        results = []
        for folder in args.folders:
            start = time.perf_counter()
            results.append(evaluate(Path(folder), args.methods))
            print(f"evaluated {folder} in {time.perf_counter() - start:.0f} s", flush=True)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results))
            if args.results:  # one file per run, as bench_shortcut.py --json writes and --load reads
                Path(args.results).mkdir(parents=True, exist_ok=True)
                run = results[-1]
                (Path(args.results) / f"{run['kind']}_{run['seed']}.json").write_text(json.dumps([run]))
    for method in args.methods:
        keys = args.keys or sorted({k for r in results for row in r["rows"][method] for k in row
                                    if k.endswith(f"8_{DEFAULT_REGION}")})
        table(results, method, keys, args.threshold, args.patience)
        if args.show:
            per_run(results, method, args.show)


if __name__ == "__main__":
    main()
