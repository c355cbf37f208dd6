"""The whole parameters for an explanation pass under a sharding strategy (Lightning's ``FSDPStrategy``).

FSDP keeps a shard of each parameter on each rank; an explanation needs the whole model. :func:`full_parameters`
gathers them with FSDP's own API (``FullyShardedDataParallel.summon_full_params``, with ``writeback=False``: what
the pass does to them is never written back to the shards) for the pass only, and frees them on exit. Peak memory
on each rank during the pass: the whole parameters of the model (on the training device), on top of the training
state; each rank needs them because each explains its share of the probes.
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


def nested_fsdp_units(model: nn.Module) -> list[str]:
    """Qualified names of the FSDP units inside ``model`` below its outermost one (an ``auto_wrap_policy``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [name for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]
    return units[1:] if units and units[0] == "" else units


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

    with FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True):
        yield
