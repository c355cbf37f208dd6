"""Fixtures for trying the library, as ``lightning.pytorch.demos``: generated images with object masks and a
small timm ViT classifier. The library does not need them; examples, tests and benchmarks use them so that
every place that trains "the example model" trains the same one on the same data.
"""

from lightning_xai.demos.data import (
    BACKGROUNDS,
    CUE_COLOURS,
    CUE_KINDS,
    FAMILIES,
    MEAN,
    SHAPE_CLASSES,
    STD,
    TEXTURE_CLASSES,
    SyntheticDataModule,
    SyntheticObjects,
    TwoObjectImages,
    add_cue,
    class_names,
    cue_region,
)
from lightning_xai.demos.model import SMALL_VIT, ViTClassifier, create_vit

__all__ = [
    "BACKGROUNDS",
    "CUE_COLOURS",
    "CUE_KINDS",
    "FAMILIES",
    "MEAN",
    "SHAPE_CLASSES",
    "SMALL_VIT",
    "STD",
    "TEXTURE_CLASSES",
    "SyntheticDataModule",
    "SyntheticObjects",
    "TwoObjectImages",
    "ViTClassifier",
    "add_cue",
    "class_names",
    "create_vit",
    "cue_region",
]
