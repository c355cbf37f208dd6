"""Explaining across ranks (DDP, FSDP): every rank explains its share of the probes and rank 0 gathers the
pieces and logs them as one process would.

The share of rank ``r`` of ``W`` is the ``r``-th of ``W`` contiguous chunks of the probe indices, so the pieces,
concatenated in rank order, are in probe order. What a rank computes does not depend on which ranks compute the
other probes (ViT-CX's and C2F's noise depends only on the method's seed, the draw and the mask, never on the
batch: :class:`~lightning_xai.explainers.masks.NoiseBank`; and none of their forwards or sums mixes probes, since
float32 matrix products round according to their shape: :class:`~lightning_xai.explainers.masks.MaskScorer`), so
the logged maps and scalars do not depend on the world size.

Every rank reaches the same collective (one ``gather_object`` to rank 0) once per event, whatever failed on it:
a rank whose forward or method raised sends what it has and the error, and rank 0 reports it. The collective
waits at most the process group's timeout (Lightning's ``DDPStrategy(timeout=...)``).
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_xai.callbacks.rng import preserved_rng
from lightning_xai.callbacks.runner import Outcome, ProbeRunner
from lightning_xai.explainers import Explanation


def share_of(count: int, rank: int, world_size: int) -> Tensor:
    """The probe indices ``(S,)`` rank ``rank`` of ``world_size`` explains: its contiguous chunk of
    ``range(count)`` (chunks differ in length by at most one; a rank beyond ``count`` gets none)."""
    return torch.arange(count).tensor_split(world_size)[rank]


@dataclass
class Piece:
    """What one rank sends to rank 0 after an event: its share's explanations (on the CPU), the methods that
    failed on it and the warnings they issued (both re-issued on rank 0), and the error of its forward, if any."""

    rank: int
    results: dict[str, Explanation] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    warned: list[tuple[str, warnings.WarningMessage]] = field(default_factory=list)
    error: str | None = None


def _to_send(result: Explanation) -> Explanation:
    """``result`` as sent to rank 0: tensors on the CPU, without its options (rank 0 has its own, and they may
    hold what does not pickle)."""
    moved = {f.name: getattr(result, f.name) for f in fields(result)}
    moved = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in moved.items()}
    return Explanation(**{**moved, "options": {}})


def _portable(caught: warnings.WarningMessage) -> warnings.WarningMessage:
    """A caught warning that pickles (its ``source`` object dropped; a message that does not pickle as text)."""
    message = caught.message
    try:
        pickle.dumps(message)
    except Exception:  # noqa: BLE001 - any warning instance that does not pickle
        message = str(message)
    return warnings.WarningMessage(message, caught.category, caught.filename, caught.lineno)


def _described(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def merge(parts: list[Explanation]) -> Explanation:
    """The explanations of consecutive probe chunks as one: every tensor field concatenated along the batch
    dimension (on the first part's device), the rest taken from the first part."""
    first = parts[0]
    device = first.maps.device
    merged: dict[str, Any] = {}
    for f in fields(first):
        value = getattr(first, f.name)
        if isinstance(value, Tensor):
            value = torch.cat([getattr(p, f.name).to(device) for p in parts])
        merged[f.name] = value
    return Explanation(**merged)


class SharedRunner:
    """A :class:`~lightning_xai.callbacks.runner.ProbeRunner` whose :meth:`run` explains this rank's share of
    the probes and gathers every rank's pieces to rank 0; everything else is the wrapped runner's.

    Args:
        runner: the runner of this rank (every rank builds one, on the same probes).
        rank, world_size: this process in the default process group.

    Attributes:
        share: ``(S,)`` the probe indices this rank explains.
        explained_here: how many probes this rank explained, over the run (each event adds its share).
    """

    def __init__(self, runner: ProbeRunner, rank: int, world_size: int) -> None:
        self.runner, self.rank, self.world_size = runner, rank, world_size
        self.share = share_of(len(runner.probes.probe.images), rank, world_size)
        self.explained_here = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def run(self, on_failure: Callable[[str, Exception], None],
            on_warning: Callable[[str, warnings.WarningMessage], bool] = lambda name, caught: False) -> Outcome:
        """Explain this rank's share, then gather (a collective every rank reaches once, failing or not).

        Returns:
            on rank 0, the outcome of every probe, as :meth:`ProbeRunner.run` returns it for one process (a
            method that failed on any rank is left out and reported to ``on_failure``; the warnings methods
            issued on every rank go to ``on_warning``); on the other ranks, their own share's outcome, or
            ``None`` when their forward failed.

        Raises:
            on rank 0 only, after the collective: the forward on the probes failed on some rank.
        """
        piece, outcome, errors = Piece(self.rank), None, {}
        if len(self.share):
            def failed(name: str, err: Exception) -> None:
                errors[name] = err
                piece.failures.append((name, _described(err)))

            try:
                with preserved_rng():
                    outcome = self.runner.run(failed, lambda name, caught: piece.warned.append(
                        (name, _portable(caught))) is None, share=self.share)
                piece.results = {name: _to_send(result) for name, result in outcome.results.items()}
                self.explained_here += len(self.share)
            except Exception as err:  # noqa: BLE001 - reported on rank 0 after the collective, never skipped
                piece.error, errors[""] = _described(err), err
        try:
            pickle.dumps(piece)  # gather_object pickles before its collective: a failure there would skip it
        except Exception as err:  # noqa: BLE001 - whatever a method or warning put in that does not pickle
            piece = Piece(self.rank, error=f"its explanations could not be sent to rank 0 ({_described(err)})")
            errors[""] = RuntimeError(piece.error)
        pieces = gather_to_zero(piece, self.world_size)
        if self.rank != 0:
            return outcome
        return self._combine(pieces, outcome, errors, on_failure, on_warning)

    def _combine(self, pieces: list[Piece], outcome: Outcome | None, errors: dict[str, Exception],
                 on_failure: Callable[[str, Exception], None],
                 on_warning: Callable[[str, warnings.WarningMessage], bool]) -> Outcome:
        """Rank 0: re-issue every rank's warnings and failures, raise a failed forward, merge the results."""
        for piece in pieces:
            for name, caught in piece.warned:
                if not on_warning(name, caught):
                    warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
        for piece in pieces:
            if piece.error is not None:
                if piece.rank == 0:
                    raise errors[""]
                raise RuntimeError(f"on rank {piece.rank}: {piece.error}")
        for piece in pieces:
            for name, text in piece.failures:
                on_failure(name, errors[name] if piece.rank == 0 else RuntimeError(f"on rank {piece.rank}: {text}"))
        count = len(self.runner.probes.probe.images)
        working = [p for p in pieces if len(share_of(count, p.rank, self.world_size))]
        outcome.results = {
            name: dataclasses.replace(merge([p.results[name] for p in working]), options=outcome.results[name].options)
            for name in self.runner.explainers if all(name in p.results for p in working)
        }
        return outcome


def gather_to_zero(piece: Piece, world_size: int) -> list[Piece]:
    """Every rank's ``piece`` on rank 0 (in rank order), ``[]`` elsewhere; one ``gather_object`` on the default
    process group, which every one of its ``world_size`` ranks must call."""
    if world_size == 1:
        return [piece]
    gathered: list[Any] | None = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(piece, gathered, dst=0)
    return gathered or []


def shared(runner: ProbeRunner, rank: int, world_size: int) -> ProbeRunner | SharedRunner:
    """``runner`` sharing the probes with the other ranks of the run (``trainer.global_rank``,
    ``trainer.world_size``: Lightning's process group is the default one) when there are several, else itself."""
    return runner if world_size == 1 else SharedRunner(runner, rank, world_size)


def take_part(runner: ProbeRunner | SharedRunner) -> None:
    """A rank other than 0 at an event: explain its share and send it to rank 0 (rank 0 reports its failures)."""
    if isinstance(runner, SharedRunner):
        runner.run(lambda name, err: None)
