"""The benchmark scripts' glue (they are run by hand, not by the suite): imports resolve, claims are judged."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench_quality():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("bench_quality")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("bench_*.py")))
def test_names_imported_from_sibling_benchmarks_exist(script, bench_quality):
    """Imports inside functions (run only at the end of a long benchmark) must still resolve."""
    tree = ast.parse((BENCHMARKS / script).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bench_"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{script}: {node.module} has no {alias.name}"


def row(method: str, iou: float, energy: float, evaluations: float = 1.0, discrimination: float = 0.5) -> dict:
    return dict(method=method, iou=iou, energy=energy, evaluations=evaluations, discrimination=discrimination)


def test_claims_judge_each_target(bench_quality):
    results = [row("raw_attention", 0.30, 0.40), row("rollout", 0.47, 0.50), row("gae", 0.49, 0.55, 1.0, 0.74),
               row("gradtoken", 0.48, 0.55, 1.0, 0.75), row("vitcx", 0.22, 0.20, 23.0),
               row("c2f", 0.44, 0.60, 50.0), row("c2f (contrast)", 0.29, 0.39, 50.0),
               row("c2f (clusters)", 0.2, 0.2, 4.0)]
    verdict = bench_quality.claims(results)
    assert verdict == {
        "C2F beats ViT-CX (IoU and energy)": True,
        "GradToken separates the two classes (class discrimination >= 0.75)": True,  # the bound is inclusive
        "GAE separates the two classes (class discrimination >= 0.75)": False,  # 0.74
        "C2F (draws) at most 2x ViT-CX's evaluations": False,  # 50 > 46
        "C2F (clusters) fewer evaluations than ViT-CX": True,
    }
    results[5] = row("c2f", 0.44, 0.19, 40.0)  # energy below ViT-CX's: IoU alone is not enough
    assert not bench_quality.claims(results)["C2F beats ViT-CX (IoU and energy)"]


def test_comparisons_are_reported_not_claimed(bench_quality):
    results = [row("rollout", 0.47, 0.50), row("gradtoken", 0.46, 0.55), row("c2f", 0.48, 0.60),
               row("c2f (contrast)", 0.29, 0.39)]
    assert bench_quality.comparisons(results) == {
        "gradtoken ahead of rollout on IoU": False,
        "c2f ahead of rollout on IoU": True,
        "c2f (contrast) ahead of rollout on IoU": False,
        "c2f (relation) ahead of c2f (contrast) on IoU and energy": True,
    }


def test_row_labels_name_the_options(bench_quality):
    labels = [bench_quality.row_label(method, options) for method, options in bench_quality.ROWS]
    assert len(set(labels)) == len(labels)
    assert {"c2f", "c2f (contrast)", "c2f (clusters)"} <= set(labels)


def test_gae_before_issue_17_gives_todays_maps(bench_quality):
    """The fused table's "before" GAE (recorded attention, whole rollout product) is the same method as today's
    (fused path, readout row read from the left): only then is its time a fair "before"."""
    import timm
    import torch

    import lightning_xai as lx

    bench_explainers = importlib.import_module("bench_explainers")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32)
    targets = torch.tensor([[1, 3], [4, 0]])
    before = bench_explainers.GAEBefore(model)(images, targets)
    today = lx.explain(model, images, method="gae", targets=targets)
    assert before.maps.abs().amax() > 0
    torch.testing.assert_close(today.maps, before.maps, rtol=1e-5, atol=1e-6)


def test_callback_overhead_benchmark_runs_every_arm_and_prints_its_table(tmp_path):
    """A tiny run of the overhead benchmark (2 epochs of 256 images): every arm trains and is timed, the hook's
    share is printed for each monitor arm, and the monitor does not change the validation accuracy."""
    command = [sys.executable, str(BENCHMARKS / "bench_callback_overhead.py"), "--epochs", "2", "--repeats", "1",
               "--num-train", "256", "--gradtoken", "--log-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0] for line in table] == [
        "| without callback", "| ExplanationMonitor with (GradToken + C2F, 8 probes)",
        "| ExplanationMonitor with, shortcut_alarm=False (GradToken + C2F, 8 probes)",
        "| ExplanationMonitor with, methods='gradtoken' (GradToken, 8 probes)"]
    assert len({line.rsplit(" | ", 1)[1] for line in table}) == 1  # the same accuracy: training is unchanged
    shares = [line for line in done.stdout.splitlines() if line.startswith("  with")]
    assert len(shares) == 3 and all("%" in line for line in shares)
