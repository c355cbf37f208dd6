"""A small timm ViT classifier as a LightningModule: what the examples, tests and benchmarks train.

It is an ordinary LightningModule (the library does not need it: any module holding a timm ViT works);
it exists so that every place that trains "the example model" trains the same one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

#: The examples' ViT: ViT-Tiny's layout shrunk to train in a minute or two on a CPU (32 px images, patch 4,
#: an 8x8 token grid). Pass as ``ViTClassifier(model_name="vit_tiny_patch16_224", image_size=32, **SMALL_VIT)``.
SMALL_VIT: dict[str, int] = dict(patch_size=4, embed_dim=64, depth=4, num_heads=4)


def create_vit(
    model_name: str = "vit_tiny_patch16_224",
    num_classes: int = 4,
    image_size: int | tuple[int, int] = 64,
    pretrained: bool = False,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """``timm.create_model`` with a clear fallback: if ``pretrained=True`` cannot download the weights
    (no network), warn and build the same architecture from scratch instead of failing."""
    kwargs = dict(num_classes=num_classes, img_size=image_size, **model_kwargs)
    if pretrained:
        try:
            return timm.create_model(model_name, pretrained=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - any hub/network failure means "train from scratch"
            warnings.warn(
                f"could not load pretrained weights for {model_name!r} ({type(err).__name__}: {err}); "
                "no network? Training from scratch instead.",
                stacklevel=2,
            )
    return timm.create_model(model_name, pretrained=False, **kwargs)


class ViTClassifier(pl.LightningModule):
    """Image classifier around a timm ViT; batches are ``(images, labels[, masks])``.

    Args:
        model_name: timm model name (e.g. ``"vit_tiny_patch16_224"``, ``"vit_small_patch16_224"``).
        num_classes: number of output logits.
        image_size: input size ``H`` or ``(H, W)``.
        lr: AdamW learning rate; ``weight_decay``: AdamW weight decay; ``warmup_epochs``: linear warm-up
            before cosine decay over ``max_epochs`` (taken from the trainer).
        pretrained: load hub weights when online (falls back to scratch offline).
        class_names: one name per class, saved with the hyperparameters so that a checkpoint knows them
            (``ViTClassifier.load_from_checkpoint(path).hparams.class_names``); ``None``: unnamed classes.
        **model_kwargs: passed to ``timm.create_model`` (``patch_size``, ``embed_dim``, ``depth``, ...).
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 4,
        image_size: int | tuple[int, int] = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: int = 1,
        pretrained: bool = False,
        class_names: Sequence[str] | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if class_names is not None:
            if isinstance(class_names, str) or len(class_names) != num_classes:
                raise ValueError(
                    f"class_names must be a list of {num_classes} names (one per class), got {class_names!r}"
                )
            class_names = [str(name) for name in class_names]
        self.save_hyperparameters()
        self.model = create_vit(model_name, num_classes, image_size, pretrained, **model_kwargs)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, num_classes)`` logits."""
        return self.model(images)

    def shared_step(self, batch: Any, stage: str) -> Tensor:
        """Loss of a ``(images, labels, ...)`` batch, logged with the accuracy as ``<stage>_loss``/``<stage>_acc``;
        override it for batches of another layout (dicts, say)."""
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=True)
        self.log(f"{stage}_acc", accuracy, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "val")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1
        warmup = min(self.hparams.warmup_epochs, epochs - 1)

        def factor(epoch: int) -> float:
            if epoch < warmup:
                return (epoch + 1) / (warmup + 1)
            progress = (epoch - warmup) / max(1, epochs - warmup)
            return 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()) * 0.95 + 0.05

        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor)}
