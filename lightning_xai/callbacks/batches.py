"""Reading probe samples from the user's data: the dataloader to draw from, and a collated batch read into
images, labels and masks (dict batches, tuples with indices or file names, or the user's ``batch_transform``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from lightning_xai.callbacks.rng import preserved_rng

#: ``batch_transform(batch) -> (images, labels, masks)``: reads a batch of the user's data (as the dataloader's
#: ``collate_fn`` makes it) into ``(P, C, H, W)`` float images and optional labels and masks (``None`` if absent).
BatchTransform = Callable[[Any], tuple[Tensor, Tensor | None, Tensor | None]] | None
#: ``hooks(batch) -> batch``: a collated batch as the ``*_step`` methods get it (see :func:`through_batch_hooks`).
BatchHooks = Callable[[Any], Any] | None

IMAGE_KEYS = ("image", "images", "pixel_values", "img", "input", "inputs", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "class", "y")
MASK_KEYS = ("mask", "masks", "segmentation", "object_mask")


class Samples(NamedTuple):
    """Samples drawn from a dataset, as read from their collated batch (not yet checked).

    Attributes:
        indices: the dataset indices drawn, sorted.
        images, labels, masks: what the reader returned (``None`` where absent).
        source: how to name the images in an error message.
    """

    indices: list[int]
    images: Any
    labels: Any
    masks: Any
    source: str


def _looks_like_masks(value: Any, images: Tensor) -> bool:
    return (
        isinstance(value, Tensor)
        and value.dim() in (3, 4)
        and value.shape[0] == images.shape[0]
        and tuple(value.shape[-2:]) == tuple(images.shape[-2:])
    )


def read_batch(batch: Any) -> tuple[Any, Any, Any]:
    """The default reader of a collated batch: ``images``, ``(images, labels[, masks][, anything])`` or a dict
    with an image key (``image``, ``pixel_values``, ...), a label key and a mask key. A third element that is not
    a mask of the images' size (a sample index, file names) is ignored.

    Raises:
        ValueError: no images can be found; the message names ``batch_transform``.
    """
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        image_key = next((k for k in IMAGE_KEYS if isinstance(batch.get(k), Tensor)), None)
        if image_key is None:
            raise ValueError(
                f"cannot find the images in samples that are dicts with keys {sorted(map(str, batch))} (looked for "
                f"{list(IMAGE_KEYS)}): pass batch_transform=lambda batch: (batch['<images>'], batch['<labels>'], None)"
            )
        images = batch[image_key]
        labels = next((batch[k] for k in LABEL_KEYS if isinstance(batch.get(k), Tensor)), None)
        masks = next((batch[k] for k in MASK_KEYS if _looks_like_masks(batch.get(k), images)), None)
        return images, labels, masks
    if isinstance(batch, Sequence) and not isinstance(batch, str) and batch and isinstance(batch[0], Tensor):
        images = batch[0]
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        masks = batch[2] if len(batch) > 2 and _looks_like_masks(batch[2], images) else None
        return images, labels, masks
    raise ValueError(
        f"cannot read images from a batch of type {type(batch).__name__}: pass "
        "batch_transform=lambda batch: (images, labels or None, masks or None)"
    )


def _first_loader(loader: Any) -> DataLoader | None:
    if isinstance(loader, DataLoader):
        return loader
    if isinstance(loader, Mapping) and loader:
        loader = list(loader.values())
    if isinstance(loader, list | tuple) and loader and isinstance(loader[0], DataLoader):
        return loader[0]
    return None


def find_loader(trainer: pl.Trainer, split: str) -> DataLoader | None:
    """The trainer's ``split`` (``"val"`` or ``"train"``) DataLoader, without iterating it.

    Looks at dataloaders the trainer has already loaded, then at the datamodule's and the LightningModule's
    ``*_dataloader()`` methods (building a DataLoader object draws no random numbers and starts no worker).
    """
    loaded = _first_loader(trainer.val_dataloaders if split == "val" else trainer.train_dataloader)
    if loaded is not None:
        return loaded
    # what fit()/validate() was given: a datamodule, the module's *_dataloader() or loaders passed directly
    loop = trainer.fit_loop.epoch_loop.val_loop if split == "val" else trainer.fit_loop
    if split == "val" and trainer.state.fn == "validate":
        loop = trainer.validate_loop
    source = getattr(loop, "_data_source", None)
    if source is not None and source.is_defined():
        try:
            with preserved_rng():
                loaded = _first_loader(source.dataloader())
        except Exception:  # noqa: BLE001 - fall back to the owners below
            loaded = None
        if loaded is not None:
            return loaded
    for owner in (trainer.datamodule, trainer.lightning_module):
        method = getattr(owner, f"{split}_dataloader", None)
        if method is None:
            continue
        try:
            with preserved_rng():
                loader = _first_loader(method())
        except Exception:  # noqa: BLE001 - a loader that cannot be built yet is "not found"
            loader = None
        if loader is not None:
            return loader
    return None


def read_samples(batch: Any, batch_transform: BatchTransform = None) -> tuple[Any, Any, Any]:
    """``(images, labels, masks)`` of a collated ``batch``: ``batch_transform(batch)`` or :func:`read_batch`.

    Raises:
        ValueError: ``batch_transform`` returned something other than three items; the message says what to return.
    """
    if batch_transform is None:
        return read_batch(batch)
    out = batch_transform(batch)
    if not isinstance(out, tuple | list) or len(out) != 3:
        got = f"{len(out)} items" if isinstance(out, tuple | list) else f"a {type(out).__name__}"
        raise ValueError(f"batch_transform must return (images, labels, masks), three items (labels and masks may "
                         f"be None), got {got}: e.g. batch_transform=lambda batch: (batch[0], batch[1], None)")
    return tuple(out)


def through_batch_hooks(trainer: pl.Trainer, split: str, dataloader_idx: int = 0) -> BatchHooks:
    """``batch -> batch`` as the Trainer hands a ``split`` batch to a ``*_step``: the module's
    ``on_before_batch_transfer``, ``transfer_batch_to_device`` (to the strategy's device) and
    ``on_after_batch_transfer`` (where GPU/Kornia pipelines normalise), each with ``dataloader_idx``, while the
    trainer is in that split's stage (``trainer.validating`` for ``"val"``: hooks that augment only while
    ``trainer.training`` leave validation probes alone, as in validation)."""
    module, device = trainer.lightning_module, trainer.strategy.root_device
    stage = RunningStage.VALIDATING if split == "val" else RunningStage.TRAINING

    def run(batch: Any) -> Any:
        saved, trainer.state.stage = trainer.state.stage, stage
        try:
            batch = module.on_before_batch_transfer(batch, dataloader_idx)
            batch = module.transfer_batch_to_device(batch, device, dataloader_idx)
            return module.on_after_batch_transfer(batch, dataloader_idx)
        finally:
            trainer.state.stage = saved

    return run


def from_loader(loader: DataLoader, num_samples: int, seed: int, batch_transform: BatchTransform = None,
                hooks: BatchHooks = None, indices: list[int] | None = None) -> Samples:
    """Draw ``num_samples`` samples of ``loader``'s dataset (all of them if it has fewer, with a warning) with a
    private generator seeded by ``seed``; collate them with the loader's ``collate_fn``, pass the batch through
    ``hooks`` (the module's batch hooks, see :func:`through_batch_hooks`) and read it with ``batch_transform``
    (default :func:`read_batch`). ``indices``: take these dataset indices instead of a draw (a resumed run's).

    Raises:
        ValueError: the batch hooks fail on the probe batch (the message names ``probe_images``).
    """
    dataset: Dataset = loader.dataset
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            "the probe dataset has no len() (an IterableDataset?): pass probe_images=... explicitly"
        ) from None
    if size == 0:
        raise ValueError("the dataset to draw probes from is empty")
    if num_samples > size:
        rank_zero_warn(f"num_probes={num_samples} but the dataset has {size} samples: explaining all {size}")
    if indices is None:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        indices = order[:num_samples].sort().values.tolist()
    elif not all(0 <= int(i) < size for i in indices):
        raise ValueError(f"the saved sample indices do not fit the dataset of {size} samples: was it changed "
                         "since the checkpoint was written?")
    collate = loader.collate_fn or default_collate
    with preserved_rng():  # a random transform in __getitem__ or a hook must not advance the user's RNG
        batch = collate([dataset[i] for i in indices])
        if hooks is not None:
            try:
                batch = hooks(batch)
            except Exception as err:
                raise ValueError(
                    f"running the probe batch through your module's batch hooks (on_before_batch_transfer, "
                    f"transfer_batch_to_device, on_after_batch_transfer) failed ({type(err).__name__}: {err}): pass "
                    "probe_images=... already preprocessed as your model takes them"
                ) from err
    images, labels, masks = read_samples(batch, batch_transform)
    source = "batch_transform(batch)[0]" if batch_transform is not None else "the images read from the dataset"
    if isinstance(images, Tensor) and images.dim() == 4 and images.dtype == torch.uint8:
        source += " (uint8: pass batch_transform=... that converts and normalises them as for training)"
    return Samples(indices, images, labels, masks, source)


def draw_samples(trainer: pl.Trainer, split: str, num_samples: int, seed: int,
                 batch_transform: BatchTransform = None, indices: list[int] | None = None) -> Samples:
    """Samples drawn from the trainer's ``split`` (``"val"`` or ``"train"``) dataloader (see :func:`from_loader`),
    passed through the module's batch hooks on its device as the Trainer passes its batches (the first dataloader:
    ``dataloader_idx=0``).

    Raises:
        ValueError: there is no such dataloader; the message names ``probe_images`` and the other split.
    """
    loader = find_loader(trainer, split)
    if loader is None:
        other = "train" if split == "val" else "val"
        raise ValueError(f"no {split} dataloader to draw probes from: pass probe_images=... to the callback, or "
                         f"probe_split={other!r}")
    hooks = through_batch_hooks(trainer, split)
    return from_loader(loader, num_samples, seed, batch_transform, hooks, indices)
