"""Speed and memory of each explainer on CPU, relative to one plain forward+backward of the same batch,
and ViT-CX against C2F-Explainer (model evaluations, time, localisation on the texture family).
Run from the repository root or from ``benchmarks/``.

    python benchmarks/bench_explainers.py            # ViT-Tiny and ViT-Small sized, 224 px, batch 4
    python benchmarks/bench_explainers.py --quick    # smaller, for a smoke run
    OMP_NUM_THREADS=1 python benchmarks/bench_explainers.py --fused-only   # issue 17's table and targets

The fused-path table times the attention methods on the fused path (the model's own attention kernel,
``q, k, v`` recorded, rows recomputed) and on the recorded-attention path (probabilities in the graph),
interleaved with a training step (forward and backward with parameter gradients) of the same batch, and
judges issue 17's targets. Each explainer is built once and called every round, as the callbacks do; one
extra row times GradToken through ``lx.explain``, which builds the explainer at every call, and one the floor of
any gradient method on the fused path (a forward and the gradient at the attention outputs, nothing else, in
plain torch). Ratios are given in wall-clock time and in the process's CPU time (which leaves out waiting for
a core on a shared machine).

The second table times ViT-CX and C2F with the masks' cosine distances in float32 on the masks' device (the
library's) against the float64 CPU computation they replaced (``bench_quality.float64_cosine_distances``,
swapped in for the "before" runs), alternating the two so that both see the same machine load.

Every ratio is measured in one run on one machine; times are medians over ``--repeats`` runs. Peak memory
is the growth of the resident set above its level before the call, sampled every millisecond.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

import timm
import torch

import lightning_xai as lx
from lightning_xai.explainers import masks as mask_module
from lightning_xai.explainers import perturbation
from lightning_xai.explainers.base import RawMaps
from lightning_xai.explainers.fused import recorded_path
from lightning_xai.explainers.gradient import GradientRollout
from lightning_xai.explainers.relevance import query_row

METHODS = ["raw_attention", "rollout", "gae", "gradtoken", "vitcx", "c2f"]
SIZES = {
    "vit-tiny": dict(model_name="vit_tiny_patch16_224"),
    "vit-small": dict(model_name="vit_small_patch16_224"),
}


def build(name: str, image_size: int, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(SIZES[name]["model_name"], pretrained=False, img_size=image_size,
                             num_classes=num_classes).eval()


def forward_backward(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> None:
    """The reference cost: one training-style forward and backward (parameter gradients) of the batch."""
    logits = model(images)
    logits.gather(1, targets[:, None]).sum().backward()
    model.zero_grad(set_to_none=True)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call, and the last call's result."""
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def set_mmap_threshold(size: int) -> None:
    """glibc serves allocations above ``size`` bytes with their own mmap, released on free. Memory is
    measured with a small threshold (128 KiB), so that the resident set follows the live tensors (by
    default glibc raises the threshold as the program runs and keeps freed memory, which hides peaks);
    times with a large one (64 MiB), as a long-running training process would have. No-op without glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(size))  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)  # hand back what the heap holds free, so that new peaks show
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak growth of the process's resident memory while the context runs, sampled every millisecond.

    PyTorch's CPU allocator has no peak counter; large tensors are mmap-ed and returned to the system when
    freed, so sampling ``/proc/self/statm`` follows the live tensor memory closely.
    """

    page = resource.getpagesize()

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def peak_memory_mib(fn) -> float:
    set_mmap_threshold(128 * 1024)
    try:
        with PeakRSS() as peak:
            fn()
    finally:
        set_mmap_threshold(64 * 2**20)
    return peak.mib


def bench_model(size: str, image_size: int, batch: int, repeats: int, memory: bool) -> None:
    """Print one table row per method for one model size."""
    set_mmap_threshold(64 * 2**20)
    model = build(size, image_size)
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    targets = torch.zeros(batch, dtype=torch.long)
    reference_fn = partial(forward_backward, model, images, targets)
    reference, _ = timed(reference_fn, repeats)
    ref_mem = peak_memory_mib(reference_fn) if memory else float("nan")
    print(f"| {size} | forward+backward | {1000 * reference / batch:.1f} | 1.00 | {ref_mem:.0f} | 1 |")
    for method in METHODS:
        run = partial(lx.explain, model, images, method=method, targets=targets)
        seconds, result = timed(run, 1 if method in ("vitcx", "c2f") else repeats)
        mem = peak_memory_mib(run) if memory else float("nan")
        evals = result.evaluations_per_image
        print(f"| {size} | {method} | {1000 * seconds / batch:.1f} | {seconds / reference:.2f} | {mem:.0f} | "
              f"{'1' if evals is None else f'{evals:.0f}'} |")


def speed_table(sizes: list[str], image_size: int, batch: int, repeats: int, memory: bool) -> None:
    print(f"\n## Speed and memory (CPU, {torch.get_num_threads()} threads, {image_size}px, batch {batch})\n")
    print("| model | method | ms / image | x forward+backward | peak memory (MiB) | evaluations / image |")
    print("|---|---|---:|---:|---:|---:|")
    for size in sizes:
        bench_model(size, image_size, batch, repeats, memory)


#: the one-pass attention methods, each timed on the fused path and on the recorded-attention path (issue 17)
ATTENTION_METHODS = ["raw_attention", "rollout", "gae", "gradtoken"]
#: (model, px, batch, timed) of the fused-path table; ViT-Small 384 at batch 8 is the memory target's
#: configuration, measured for memory only (timing it would double the run)
FUSED_CONFIGS = [("vit-tiny", 224, 4, True), ("vit-small", 384, 4, True), ("vit-small", 384, 8, False)]


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Median seconds of each run over ``rounds`` rounds in which every run is called once, in turn, so that all
    see the same machine load; one warm-up round first. Per run ``(wall-clock seconds, CPU seconds)``: the
    process's CPU time leaves out the time it waited for a core, which a shared machine adds to the wall clock."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for round_ in range(rounds + 1):
        for name, fn in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if round_:
                samples[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
    nan = float("nan")
    return {name: tuple(statistics.median(v) for v in zip(*values, strict=True)) if values else (nan, nan)
            for name, values in samples.items()}


def explain_on(path: str, explainer: lx.Explainer, images: torch.Tensor, targets: torch.Tensor):
    """``explainer`` on the fused path (``path="fused"``, the library's default) or the recorded one."""
    with contextlib.nullcontext() if path == "fused" else recorded_path():
        return explainer(images, targets)


#: the extra row of the fused table: GradToken through ``lx.explain``, which builds its explainer at every call
#: (and so runs the one-image forward that reads the model's geometry again)
EXPLAIN_PER_CALL = ("gradtoken", "fused, lx.explain")


#: the GAE row "before issue 17": the recorded-attention path with the whole rollout product ``R = R + W R`` (``T^3``
#: per block and target) that GAE computed when the issue was filed; its target compares the fused path with this
GAE_BEFORE = ("gae", "recorded, whole product (before)")


class GAEBefore(GradientRollout):
    """GAE as it was computed when issue 17 was filed: the attention probabilities and their gradients recorded in
    the graph, and the whole relevance matrix ``R = R + mean_h relu(dy/dA ⊙ A) R`` rolled out block by block, read at
    the end (today's code reads the readout row from the left instead, ``T^2`` per block; same maps)."""

    def compute(self, x, targets, geom):
        attn, grads, resolved, probs = self.attention_gradients(x, targets, self.objective)
        batch, k = resolved.shape
        tokens = attn[0].shape[-1]
        relevance = torch.eye(tokens, device=x.device).expand(batch, k, tokens, tokens)
        for layer, grad in zip(attn, grads, strict=True):
            relevance = relevance + (grad * layer.unsqueeze(1)).clamp_min(0).mean(2) @ relevance
        return RawMaps(query_row(relevance, geom), resolved, probs)


#: the floor row of the fused table: what any fused-path gradient method must spend, nothing more
FLOOR = ("floor: forward + dy/do", "-")


def forward_and_attention_output_gradients(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> None:
    """The fused path's floor, written with plain torch for a timm ViT: one forward with the fused attention
    kernel and one gradient of the targets' logits at each block's attention output (no weight gradients);
    no explainer, no recomputed rows, no maps."""
    outputs: list[torch.Tensor] = []
    hooks = [block.attn.norm.register_forward_pre_hook(lambda _m, args: outputs.append(args[0]))
             for block in model.blocks]
    try:
        logits = model(images)
        torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), outputs)
    finally:
        for hook in hooks:
            hook.remove()


def fused_rows(size: str, image_size: int, batch: int, repeats: int, memory: bool) -> dict[tuple[str, str], tuple]:
    """One model's rows: ``{(method, path): (seconds, CPU seconds, peak MiB)}``, the training step under
    ``("train", "-")``; ``repeats=0``: one warm-up call each and no times (NaN). Each method's explainer is built
    once and called every round, as the callbacks do; :data:`EXPLAIN_PER_CALL` times ``lx.explain`` as well, and
    :data:`FLOOR` the fused path's floor."""
    set_mmap_threshold(64 * 2**20)
    model = build(size, image_size)
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    targets = torch.zeros(batch, dtype=torch.long)
    runs = {("train", "-"): partial(forward_backward, model, images, targets)}
    for method in ATTENTION_METHODS:
        explainer = lx.create_explainer(method, model)
        for path in ("recorded", "fused"):
            runs[(method, path)] = partial(explain_on, path, explainer, images, targets)
    runs[GAE_BEFORE] = partial(GAEBefore(model), images, targets)
    runs[EXPLAIN_PER_CALL] = partial(lx.explain, model, images, method="gradtoken", targets=targets)
    runs[FLOOR] = partial(forward_and_attention_output_gradients, model, images, targets)
    times = interleaved(runs, repeats)
    return {key: (*times[key], peak_memory_mib(fn) if memory else float("nan")) for key, fn in runs.items()}


def fused_table(configs: list[tuple[str, int, int, bool]], repeats: int, memory: bool) -> None:
    """The fused path against the recorded-attention path and a training step (issue 17's targets)."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n## Fused attention path vs recorded attention (CPU, {torch.get_num_threads()} thread(s), medians of "
          f"{repeats} interleaved rounds, load average {load})\n")
    print("| model | px | batch | method | path | ms / image | x training step | x training step, CPU time | "
          "peak memory (MiB) | x training step's memory |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|")
    verdicts = []
    for size, image_size, batch, timed in configs:
        rows = fused_rows(size, image_size, batch, repeats if timed else 0, memory)
        step_s, step_cpu, step_mib = rows[("train", "-")]
        for (method, path), (seconds, cpu, mib) in rows.items():
            if seconds == seconds:  # not NaN: timed
                ms, ratio = f"{1000 * seconds / batch:.1f}", f"{seconds / step_s:.2f}"
                cpu_ratio = f"{cpu / step_cpu:.2f}"
            else:
                ms = ratio = cpu_ratio = "-"
            print(f"| {size} | {image_size} | {batch} | {'training step' if method == 'train' else method} | {path} | "
                  f"{ms} | {ratio} | {cpu_ratio} | {mib:.0f} | {mib / step_mib:.2f} |", flush=True)
        verdicts += fused_verdicts(size, image_size, batch, rows)
    print()
    for claim, holds in verdicts:
        print(f"- {'holds' if holds else 'FAILS'}: {claim}")


def fused_verdicts(size: str, image_size: int, batch: int, rows: dict) -> list[tuple[str, bool]]:
    """Issue 17's targets that apply to this configuration, judged."""
    where = f"{size} {image_size}px batch {batch}"
    step_s, step_cpu, step_mib = rows[("train", "-")]
    (grad_s, grad_cpu, grad_mib), (gae_s, _, gae_mib) = rows[("gradtoken", "fused")], rows[("gae", "fused")]
    old_gae_s, _, old_gae_mib = rows[GAE_BEFORE]
    recorded_gae_s = rows[("gae", "recorded")][0]
    verdicts = []
    if (size, image_size, batch) in (("vit-tiny", 224, 4), ("vit-small", 384, 4)):
        verdicts.append((f"GradToken <= 0.76x a training step's time, {where}: {grad_s / step_s:.2f}x "
                         f"(CPU time {grad_cpu / step_cpu:.2f}x)", grad_s / step_s <= 0.76))
    if (size, image_size) == ("vit-small", 384):
        if batch == 8:
            verdicts.append((f"GradToken peak memory <= 1.05x a training step's, {where}: {grad_mib / step_mib:.2f}x",
                             grad_mib / step_mib <= 1.05))
        if gae_s == gae_s:  # timed (not NaN)
            verdicts.append((f"GAE no slower than before issue 17 (recorded path, whole rollout product), {where}: "
                             f"{gae_s / old_gae_s:.2f}x of its time (and {gae_s / recorded_gae_s:.2f}x of today's "
                             f"recorded path)", gae_s <= old_gae_s))
        verdicts.append((f"GAE peak memory >= 30 % below before issue 17 (recorded path), {where}: "
                         f"{100 * (1 - gae_mib / old_gae_mib):.0f} % below", gae_mib <= 0.7 * old_gae_mib))
    return verdicts


@contextlib.contextmanager
def mask_distances(fn: Callable) -> Iterator[None]:
    """Use ``fn`` as the masks' pairwise cosine distances inside the context (the "before" of issue 9)."""
    saved = mask_module.cosine_distances
    mask_module.cosine_distances = perturbation.cosine_distances = fn
    try:
        yield
    finally:
        mask_module.cosine_distances = perturbation.cosine_distances = saved


def cosine_table(size: str, image_size: int, batch: int, repeats: int) -> None:
    """Seconds and evaluations per image of ViT-CX and C2F with float64 CPU mask distances (before) and
    float32 ones on the masks' device (after), runs alternated; whether the maps are identical."""
    from bench_quality import float64_cosine_distances

    model = build(size, image_size)
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    targets = torch.zeros(batch, dtype=torch.long)
    masks = torch.rand(192, image_size, image_size, generator=torch.Generator().manual_seed(0))
    after_fn = mask_module.cosine_distances
    print(f"\n## Mask cosine distances, float64 on CPU (before) vs float32 on the masks' device (after): {size}, "
          f"{image_size}px, batch {batch}, medians of {repeats} alternated runs\n")
    print("| method | s / image before | s / image after | after / before | evaluations / image before | "
          "evaluations / image after | same maps |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, fn in (("distances alone (192 masks)", None), ("vitcx", "vitcx"), ("c2f", "c2f")):
        samples: dict[str, list[float]] = {"before": [], "after": []}
        results = {}
        for _ in range(repeats + 1):  # the first round warms up
            for when, distances in (("before", float64_cosine_distances), ("after", after_fn)):
                with mask_distances(distances):
                    start = time.perf_counter()
                    results[when] = distances(masks) if fn is None else lx.explain(
                        model, images, method=fn, targets=targets)
                    samples[when].append(time.perf_counter() - start)
        per_image = {k: statistics.median(v[1:]) / (1 if fn is None else batch) for k, v in samples.items()}
        if fn is None:
            evals, same = ("-", "-"), "-"
        else:
            evals = tuple(f"{results[k].evaluations_per_image:.1f}" for k in ("before", "after"))
            same = "yes" if torch.equal(results["before"].maps, results["after"].maps) else (
                f"no (max diff {float((results['before'].maps - results['after'].maps).abs().max()):.2g})")
        print(f"| {label} | {per_image['before']:.3f} | {per_image['after']:.3f} | "
              f"{per_image['after'] / per_image['before']:.2f} | {evals[0]} | {evals[1]} | {same} |", flush=True)


def c2f_table(epochs: int, count: int) -> None:
    """ViT-CX vs C2F on the example's ViT trained here on the texture family (classes that survive no masking):
    localisation, model evaluations and time per image (``bench_quality.py`` has every method)."""
    from bench_quality import claims, quality_table, train

    module, data = train("texture", epochs, 3072 if epochs > 4 else 1024)
    rows = [("vitcx", {}), ("c2f", {}), ("c2f", {"fusion": "contrast"}), ("c2f", {"granularity": "clusters"}),
            ("gradtoken", {}), ("gae", {}), ("raw_attention", {}), ("rollout", {})]
    print()
    for claim, holds in claims(quality_table(module, data, count, rows)).items():
        print(f"- {'holds' if holds else 'FAILS'}: {claim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-fused", action="store_true", help="skip the fused vs recorded attention table")
    parser.add_argument("--fused-only", action="store_true", help="only the fused vs recorded attention table")
    parser.add_argument("--skip-cosine", action="store_true", help="skip the float64/float32 mask distance table")
    parser.add_argument("--skip-c2f", action="store_true")
    args = parser.parse_args()
    image_size, batch, epochs, count = (96, 2, 4, 16) if args.quick else (224, 4, 12, 64)
    sizes = ["vit-tiny"] if args.quick else ["vit-tiny", "vit-small"]
    if not args.skip_fused:
        fused_table([("vit-tiny", 96, 2, True)] if args.quick else FUSED_CONFIGS, args.repeats, not args.no_memory)
    if args.fused_only:
        return
    if not args.skip_speed:
        speed_table(sizes, image_size, batch, args.repeats, not args.no_memory)
    if not args.skip_cosine:
        cosine_table("vit-tiny", image_size, batch, args.repeats)
    if not args.skip_c2f:
        c2f_table(epochs, count)


if __name__ == "__main__":
    main()
