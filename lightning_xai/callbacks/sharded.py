"""The whole parameters for an explanation pass under a sharding strategy (Lightning's ``FSDPStrategy``).

FSDP keeps a shard of each parameter on each rank; an explanation needs the whole model. :func:`full_parameters`
gathers them with FSDP's own API (``FullyShardedDataParallel.summon_full_params``, with ``writeback=False``: what
the pass does to them is never written back to the shards) for the pass only, and frees them on exit. Peak memory
on each rank during the pass: the whole parameters of the model (on the training device), on top of the training
state; each rank needs them because each explains its share of the probes.

Inside, the explanation calls the module under the FSDP wrappers directly, and the forward of any FSDP unit nested in
it (an ``auto_wrap_policy``, e.g. one unit per transformer block) runs its wrapped module as a plain module: FSDP's
own forward would gather again, free the parameters after each unit and hook collectives into the backward, and
ranks explaining different probes run different numbers of forwards, so those collectives would never match.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning.pytorch as pl
from torch import nn


def fsdp_root(trainer: pl.Trainer) -> nn.Module | None:
    """The model FSDP (PyTorch's ``FullyShardedDataParallel``, FSDP1) shards in this run, or ``None``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = getattr(trainer.strategy, "model", None)
    if isinstance(model, nn.Module) and any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return model
    return None


@contextlib.contextmanager
def full_parameters(trainer: pl.Trainer) -> Iterator[None]:
    """Every rank holds the whole parameters of the module inside (under FSDP; nothing to do otherwise).

    A collective under FSDP: every rank must enter it. Gathered for the body only, freed on exit; the training
    state (the shards, their gradients and the optimizer's) is left as it was.
    """
    root = fsdp_root(trainer)
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in root.modules() if isinstance(m, FullyShardedDataParallel)]
    with FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True):
        try:
            for unit in units:  # plain modules for the pass (see the module's docstring); the class's forward after
                unit.forward = unit.module.forward
            yield
        finally:
            for unit in units:
                unit.__dict__.pop("forward", None)
