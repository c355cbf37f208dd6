"""Explaining across ranks: the explanation event's wall time with 2 ranks sharing the probes, as a ratio to 1 rank
explaining them all (target <= 0.6x for 8 probes with GradToken and C2F).

    python benchmarks/bench_ranks.py                 # the example's small ViT, 8 probes, 5 events each way
    python benchmarks/bench_ranks.py --repeats 3

Two CPU processes on gloo, one thread each (a rank per accelerator, as under DDP): the same module and probes on
both; an event is the forward on the probes plus every explainer plus the gather to rank 0
(:class:`~lightning_xai.callbacks.ranks.SharedRunner`), timed on rank 0 between barriers. "1 rank" is rank 0
running :class:`~lightning_xai.callbacks.runner.ProbeRunner` on all the probes while rank 1 waits; rank 0's share
alone, timed the same way, is the work of one rank (the ratio's floor, less sensitive to load). The figure
needs a quiet machine with at least 2 free cores: the load average is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_xai.callbacks.probes import ProbeSet
from lightning_xai.callbacks.ranks import SharedRunner
from lightning_xai.callbacks.runner import ProbeRunner
from lightning_xai.demos import SMALL_VIT, ViTClassifier
from lightning_xai.explainers.registry import resolve_methods


def _timed(run, repeats: int) -> float:
    """Median wall time of ``run()`` on rank 0 between barriers of both ranks."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        run()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, world_size: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    module = ViTClassifier(num_classes=4, model_name="vit_tiny_patch16_224", image_size=32, **SMALL_VIT).eval()
    probes = ProbeSet(torch.randn(args.probes, 3, 32, 32))
    runner = ProbeRunner(module, resolve_methods(["gradtoken", "c2f"]), probes)
    shared = SharedRunner(runner, rank, world_size)

    def fail(name, err):
        raise err

    alone = _timed(lambda: runner.run(fail) if rank == 0 else None, args.repeats)
    together = _timed(lambda: shared.run(fail), args.repeats)
    share = _timed(lambda: runner.run(fail, share=shared.share) if rank == 0 else None, args.repeats)
    if rank == 0:
        load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
        print(f"explanation event, {args.probes} probes, GradToken + C2F: 1 rank {alone:.2f} s, "
              f"2 ranks {together:.2f} s, ratio {together / alone:.2f}x (target <= 0.6x); "
              f"load average {load} on {os.cpu_count()} cores (meaningful on a quiet machine only)")
        print(f"rank 0's share alone (no other rank running, no gather): {share:.2f} s, {share / alone:.2f}x of all "
              "the probes (the ratio 2 ranks reach when nothing else competes for the cores)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=29517)
    args = parser.parse_args()
    mp.spawn(worker, args=(2, args, args.port), nprocs=2, join=True)


if __name__ == "__main__":
    main()
