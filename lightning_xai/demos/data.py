"""Generated image-classification data with pixel-exact object masks, for training and checking explainers.

Every image shows one object (or two, in :class:`TwoObjectImages`) on a cluttered background: a smooth
low-frequency colour field with small distractor marks. Two families of classes:

- ``"shape"``: the class is the object's outline (disc, square, triangle, plus, ring, diamond), filled with a
  random colour and rotated a little.
- ``"texture"``: the class is the pattern inside a random blob outline (stripes in three orientations,
  checker, dots, concentric rings). The outline carries no class information, so a perturbation method that
  blanks the object but leaves its silhouette does not leave the evidence behind.

Images are deterministic functions of ``(seed, split, index)``, returned normalised with :data:`MEAN` and
:data:`STD` as ``(3, H, W)`` float32 tensors; masks are ``(H, W)`` bool tensors.

Options make data for the shortcut alarm (:mod:`lightning_xai.shortcut`):

- ``cue_probability=p``: a *spurious cue*. With probability ``p`` an image carries a small mark that gives its
  class away; otherwise no mark. Give the training and validation splits the same ``p`` (one biased source:
  validation accuracy looks excellent) and test on a cue-free split (``p = 0``) to see the damage. Whether an
  image carries the mark is drawn from its own random stream, so the rest of the image is the same as without
  the option. ``cue_kind`` says what the mark is (:data:`CUE_KINDS`):

  - ``"colour"``: a 3 x 3 square in the top-left corner, in its class's colour (:data:`CUE_COLOURS`);
  - ``"position"``: a white 3 x 3 square along the top edge, at place ``k`` for class ``k`` (its place, not
    its look, encodes the class);
  - ``"texture"``: a 6 x 6 black-and-white patch in the bottom-right corner whose pattern is its class's.

  Sizes are for 32 px images and scale with the image. :func:`add_cue` paints any class's mark on a batch
  (to measure how much a model follows it).
- ``placement="centre"``: every object sits at the image centre, give or take 1/16 of the side; a clean
  dataset whose objects share one place, which the alarm must not mistake for a cue.
- ``background="busy"``: many more distractors, among them small patches of every class's texture and
  shape at random places (as a photo's background holds object-like clutter); a clean dataset whose
  backgrounds carry class-like pieces unrelated to the label.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

SHAPE_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "plus", "ring", "diamond")
TEXTURE_CLASSES: tuple[str, ...] = ("horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checker", "dots",
                                    "rings")
FAMILIES: dict[str, tuple[str, ...]] = {"shape": SHAPE_CLASSES, "texture": TEXTURE_CLASSES}

_SPLITS = {"train": 0, "val": 1, "test": 2, "two_objects": 3}
PLACEMENTS: tuple[str, ...] = ("random", "centre")

#: The spurious cue's colour per class (RGB in ``[0, 1]``): class ``c`` is marked with ``CUE_COLOURS[c]``.
CUE_COLOURS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0), (0.0, 0.9, 0.0), (0.0, 0.2, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0),
)
#: What the spurious cue can be (see the module docstring).
CUE_KINDS: tuple[str, ...] = ("colour", "position", "texture")
BACKGROUNDS: tuple[str, ...] = ("default", "busy")
_CUE_OFFSET, _CUE_SIDE = 1.0, 3.0  # pixels at 32 px, scaled with the image
_POSITION_STEP = 5.4  # the position cue's places along the top edge, at 32 px: 1, 6.4, ..., 28 for 6 classes
_TEXTURE_SIDE, _TEXTURE_CELLS = 6.0, 3  # the texture cue: 6 x 6 px, a 3 x 3 grid of black or white cells
#: The texture cue's pattern per class: 9 bits (row-major 3 x 3 cells, 1 = white), pairwise >= 4 bits apart.
_TEXTURE_CODES: tuple[int, ...] = (0b101010101, 0b010101010, 0b111000111, 0b000111000, 0b100100100, 0b001011110)


def _square(canvas: _Canvas, top: float, left: float, side: float) -> np.ndarray:
    """Bool ``(H, W)``: the pixels whose centres lie in the square ``[top, top + side) x [left, left + side)``
    (in 32-px units, scaled with the image)."""
    s = canvas.scale
    return ((canvas.y >= top * s) & (canvas.y < (top + side) * s)
            & (canvas.x >= left * s) & (canvas.x < (left + side) * s))


def _cue(canvas: _Canvas, kind: str, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ``label``'s mark of cue ``kind``: where it is, bool ``(H, W)``, and its RGB values ``(H, W, 3)``
    in ``[0, 1]`` (meaningful inside the mask only)."""
    if kind == "colour":
        mask = _square(canvas, _CUE_OFFSET, _CUE_OFFSET, _CUE_SIDE)
        return mask, np.broadcast_to(np.asarray(CUE_COLOURS[label]), (*mask.shape, 3))
    if kind == "position":
        mask = _square(canvas, _CUE_OFFSET, _CUE_OFFSET + _POSITION_STEP * label, _CUE_SIDE)
        return mask, np.ones((*mask.shape, 3))
    if kind == "texture":
        top = canvas.height / canvas.scale - _CUE_OFFSET - _TEXTURE_SIDE  # in 32-px units
        left = canvas.width / canvas.scale - _CUE_OFFSET - _TEXTURE_SIDE
        mask = _square(canvas, top, left, _TEXTURE_SIDE)
        cell = _TEXTURE_SIDE / _TEXTURE_CELLS * canvas.scale
        row = np.clip(((canvas.y - top * canvas.scale) // cell).astype(int), 0, _TEXTURE_CELLS - 1)
        col = np.clip(((canvas.x - left * canvas.scale) // cell).astype(int), 0, _TEXTURE_CELLS - 1)
        bit = (_TEXTURE_CODES[label] >> (_TEXTURE_CELLS**2 - 1 - (row * _TEXTURE_CELLS + col))) & 1
        return mask, np.repeat(bit[..., None].astype(float), 3, -1)
    raise ValueError(f"unknown cue_kind {kind!r}; choose one of {CUE_KINDS}")


def cue_region(image_size: int | Sequence[int], kind: str = "colour", label: int = 0) -> Tensor:
    """Where class ``label``'s spurious cue of ``kind`` is drawn: a ``(H, W)`` bool mask. ``"colour"``: a small
    square in the top-left corner (3 x 3 pixels, one pixel in from the edges, at 32 px; scaled with the image's
    shorter side), the same for every class; ``"position"``: the square at place ``label`` along the top edge;
    ``"texture"``: the 6 x 6 patch in the bottom-right corner."""
    return torch.from_numpy(_cue(_Canvas(*_size(image_size)), kind, int(label))[0])


def add_cue(images: Tensor, classes: Tensor | Sequence[int], kind: str = "colour") -> Tensor:
    """``images`` ``(B, 3, H, W)`` (normalised with :data:`MEAN`/:data:`STD`) with the cue of ``kind`` of class
    ``classes[b]`` painted on image ``b`` (another class's mark on an image measures how far a model follows
    the mark); returns a new tensor, no pixel noise added."""
    canvas = _Canvas(*images.shape[-2:])
    out = images.clone()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for label in {int(c) for c in classes}:  # one mark per class, painted on all that class's images at once
        mask, values = _cue(canvas, kind, label)
        rows = torch.tensor([int(c) == label for c in classes])
        colour = (torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).permute(2, 0, 1) - mean) / std
        where = torch.from_numpy(mask)
        out[rows] = torch.where(where, colour.to(out), out[rows])
    return out


def class_names(family: str = "shape", num_classes: int | None = None) -> tuple[str, ...]:
    """The names of the first ``num_classes`` classes of ``family`` (all of them when ``None``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    names = FAMILIES[family]
    if num_classes is None:
        return names
    if not 2 <= int(num_classes) <= len(names):
        raise ValueError(f"num_classes={num_classes} is out of range for family {family!r}: use 2..{len(names)}")
    return names[: int(num_classes)]


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"image_size must be an int or (height, width), each at least 16; got {image_size!r}")
    return size  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- drawing


class _Canvas:
    """Pixel-centre coordinates of one ``(H, W)`` image, in pixels, and helpers to draw on it."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.y, self.x = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
        self.scale = min(height, width) / 32.0  # sizes below are given for a 32-pixel image

    def local(self, cy: float, cx: float, radius: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates ``(u, v)`` of every pixel in the object's frame: centred, rotated, unit radius."""
        dy, dx = (self.y - cy) / radius, (self.x - cx) / radius
        cos, sin = math.cos(angle), math.sin(angle)
        return cos * dx + sin * dy, -sin * dx + cos * dy


def _colour(rng: np.random.Generator, avoid: np.ndarray | None = None, distance: float = 0.45) -> np.ndarray:
    """A saturated random RGB colour in ``[0, 1]``, at least ``distance`` (L1 / 3) from ``avoid`` if possible."""
    best, best_gap = None, -1.0
    for _ in range(16):
        hue, sat, val = rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.35, 1.0)
        k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
        colour = val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
        gap = 1.0 if avoid is None else float(np.abs(colour - avoid).mean())
        if gap >= distance:
            return colour
        if gap > best_gap:
            best, best_gap = colour, gap
    return best  # type: ignore[return-value]


def _background(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """Smooth low-frequency colour field ``(H, W, 3)`` plus small distractor marks."""
    h, w = canvas.height, canvas.width
    base = rng.uniform(0.25, 0.75, size=3)
    image = np.broadcast_to(base, (h, w, 3)).copy()
    for _ in range(3):
        freq = rng.uniform(-1.5, 1.5, size=2)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.cos(2 * math.pi * (freq[0] * canvas.y / h + freq[1] * canvas.x / w) + phase)
        image += wave[..., None] * rng.uniform(-0.12, 0.12, size=3)
    for _ in range(int(rng.integers(3, 7))):  # distractors: small dots and short strokes
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        colour = _colour(rng)
        if rng.random() < 0.5:
            radius = rng.uniform(0.8, 1.8) * canvas.scale
            mark = (canvas.y - cy) ** 2 + (canvas.x - cx) ** 2 <= radius**2
        else:
            length = rng.uniform(2.0, 4.0) * canvas.scale
            u, v = canvas.local(cy, cx, length, rng.uniform(0, math.pi))
            mark = (np.abs(u) <= 1.0) & (np.abs(v) <= 0.6 * canvas.scale / length)
        image[mark] = colour
    return image


def _busy_clutter(rng: np.random.Generator, image: np.ndarray, canvas: _Canvas, family: str,
                  classes: Sequence[str]) -> None:
    """More distractors on ``image`` (in place): 8-14 small marks and 2-4 small pieces of random classes' objects
    (a third of an object's size), at random places, unrelated to the image's label."""
    h, w = canvas.height, canvas.width
    for _ in range(int(rng.integers(8, 15))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        radius = rng.uniform(0.8, 2.0) * canvas.scale
        image[(canvas.y - cy) ** 2 + (canvas.x - cx) ** 2 <= radius**2] = _colour(rng)
    for _ in range(int(rng.integers(2, 5))):
        name = classes[int(rng.integers(len(classes)))]
        radius = rng.uniform(0.18, 0.3) * min(h, w) / 2
        cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
        _paint_object(rng, image, canvas, family, name, cy, cx, radius)


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape ``name`` in unit object coordinates ``(u, v)``; returns a bool array."""
    if name == "disc":
        return u**2 + v**2 <= 0.85
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if name == "triangle":
        return (v <= 0.55) & (v >= -1.0 + math.sqrt(3) * np.abs(u))
    if name == "plus":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if name == "ring":
        rho = np.sqrt(u**2 + v**2)
        return (rho <= 1.0) & (rho >= 0.55)
    if name == "diamond":
        return np.abs(u) / 0.72 + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {name!r}")


def _blob_mask(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A random smooth star-shaped outline around the origin of unit radius (on average)."""
    rho, phi = np.sqrt(u**2 + v**2), np.arctan2(v, u)
    radius = np.full_like(rho, 0.9)
    for k in (2, 3, 4):
        radius += rng.uniform(0.0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    return rho <= radius


def _texture(name: str, rng: np.random.Generator, canvas: _Canvas, cy: float, cx: float) -> np.ndarray:
    """Bool pattern ``(H, W)`` of texture ``name`` (True = first colour), period 4-6 px at 32 px images."""
    period = rng.uniform(4.0, 6.0) * max(1.0, canvas.scale / 2.0)
    angle = rng.uniform(-0.17, 0.17)
    u, v = canvas.local(cy, cx, period / (2 * math.pi), angle)  # one period = 2 pi in (u, v)
    phase = rng.uniform(0, 2 * math.pi, size=2)
    if name == "horizontal_stripes":
        return np.sin(v + phase[0]) > 0
    if name == "vertical_stripes":
        return np.sin(u + phase[0]) > 0
    if name == "diagonal_stripes":
        return np.sin((u + v) / math.sqrt(2) + phase[0]) > 0
    if name == "checker":
        return np.sin(u + phase[0]) * np.sin(v + phase[1]) > 0
    if name == "dots":
        du = (u + phase[0]) % (2 * math.pi) - math.pi
        dv = (v + phase[1]) % (2 * math.pi) - math.pi
        return du**2 + dv**2 <= (0.42 * 2 * math.pi / 2) ** 2
    if name == "rings":
        return np.sin(np.sqrt(u**2 + v**2) + phase[0]) > 0
    raise ValueError(f"unknown texture {name!r}")


def _paint_object(
    rng: np.random.Generator, image: np.ndarray, canvas: _Canvas, family: str, name: str,
    cy: float, cx: float, radius: float,
) -> np.ndarray:
    """Draw object ``name`` centred at ``(cy, cx)`` into ``image`` (in place); returns its bool mask."""
    angle = rng.uniform(-math.pi / 12, math.pi / 12)
    u, v = canvas.local(cy, cx, radius, angle)
    local_bg = image[int(min(cy, canvas.height - 1)), int(min(cx, canvas.width - 1))]
    if family == "shape":
        mask = _shape_mask(name, u, v)
        colour = _colour(rng, avoid=local_bg)
        shade = 1.0 + 0.08 * (u - v)[..., None]  # a little shading, so the fill is not perfectly flat
        image[mask] = np.clip(colour * shade, 0, 1)[mask]
        return mask
    mask = _blob_mask(rng, u, v)
    first = _colour(rng, avoid=local_bg, distance=0.3)
    second = _colour(rng, avoid=first, distance=0.45)
    pattern = _texture(name, rng, canvas, cy, cx)
    painted = np.where(pattern[..., None], first, second)
    image[mask] = painted[mask]
    return mask


def _finish(rng: np.random.Generator, image: np.ndarray) -> Tensor:
    """Add mild pixel noise, clip to ``[0, 1]`` and normalise: ``(H, W, 3)`` -> ``(3, H, W)`` float32."""
    image = np.clip(image + rng.normal(0.0, 0.02, size=image.shape), 0.0, 1.0)
    tensor = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (tensor - mean) / std


_CUE_STREAM = 7919  # a fourth seed word: the cue's draw never shifts the image's own random stream
_CLUTTER_STREAM = 104729  # the busy background's own stream, likewise


def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), split, int(index)]))


def _indices(indices: int | Iterable[int] | Tensor, length: int) -> list[int]:
    if isinstance(indices, int):
        indices = range(indices)
    out = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
    if not out:
        raise ValueError("batch() needs at least one index")
    bad = [i for i in out if not -length <= i < length]
    if bad:
        raise IndexError(f"indices {bad[:5]} out of range for a dataset of {length} samples")
    return [i % length for i in out]


# ----------------------------------------------------------------------------------------------- datasets


class SyntheticObjects(Dataset):
    """One object per image on a cluttered background, with its pixel mask.

    Args:
        num_samples: dataset length.
        image_size: side in pixels, or ``(height, width)``.
        family: ``"shape"`` or ``"texture"`` (see the module docstring).
        num_classes: use the first ``num_classes`` classes of the family (2..6; default: all).
        seed: images are a deterministic function of ``(seed, split, index)``.
        split: ``"train"``, ``"val"`` or ``"test"``; different splits hold different images.
        return_mask: ``__getitem__`` returns ``(image, label, mask)`` instead of ``(image, label)``.
        augment: random horizontal flip and a shift of up to 1/16 of the side (torch's global RNG), applied
            in ``__getitem__`` only (``sample``/``batch`` stay deterministic).
        cue_probability: probability that an image carries the spurious cue, a small mark that gives its class
            away (:func:`cue_region`); ``0`` (default) = no cue. The mark is drawn over the object, and the mask
            leaves its pixels out.
        placement: ``"random"`` (default) anywhere in the image, or ``"centre"``: at the centre, give or take
            1/16 of the side.
        cue_kind: what the cue is, one of :data:`CUE_KINDS` (see the module docstring); default ``"colour"``.
        background: ``"default"`` or ``"busy"`` (many more distractors, pieces of random classes' objects among
            them; see the module docstring).

    ``__getitem__`` returns ``image (3, H, W)`` float32 normalised with :data:`MEAN`/:data:`STD`, ``label``
    (int tensor) and optionally ``mask (H, W)`` bool.
    """

    def __init__(
        self,
        num_samples: int = 1024,
        image_size: int | Sequence[int] = 32,
        family: str = "shape",
        num_classes: int | None = None,
        seed: int = 0,
        split: str = "train",
        return_mask: bool = False,
        augment: bool = False,
        cue_probability: float = 0.0,
        placement: str = "random",
        cue_kind: str = "colour",
        background: str = "default",
    ):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(_SPLITS)}")
        self.classes = class_names(family, num_classes)
        self.family, self.num_samples, self.seed, self.split = family, int(num_samples), int(seed), split
        self.image_size = _size(image_size)
        self.return_mask, self.augment = return_mask, augment
        self.cue_probability, self.placement = _check_cue_and_placement(cue_probability, placement)
        self.cue_kind, self.background = _check_kinds(cue_kind, background)
        self._canvas = _Canvas(*self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_samples

    def label(self, index: int) -> int:
        """The class of sample ``index`` (classes cycle, so every class is equally frequent)."""
        return int(index) % self.num_classes

    def sample(self, index: int) -> tuple[Tensor, int, Tensor]:
        """Sample ``index``: ``image (3, H, W)``, ``label``, ``mask (H, W)`` bool; no augmentation."""
        index = _indices([index], self.num_samples)[0]
        rng = _rng(self.seed, _SPLITS[self.split], index)
        canvas, label = self._canvas, self.label(index)
        image = _background(rng, canvas)
        if self.background == "busy":
            clutter = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLITS[self.split], index,
                                                                    _CLUTTER_STREAM]))
            _busy_clutter(clutter, image, canvas, self.family, self.classes)
        side = min(canvas.height, canvas.width)
        radius = rng.uniform(0.30, 0.55) * side / 2
        if self.placement == "centre":  # same number of draws as "random": the rest of the image is unchanged
            jitter = side / 16
            cy = rng.uniform(canvas.height / 2 - jitter, canvas.height / 2 + jitter)
            cx = rng.uniform(canvas.width / 2 - jitter, canvas.width / 2 + jitter)
        else:
            cy = rng.uniform(radius + 1, canvas.height - radius - 1)
            cx = rng.uniform(radius + 1, canvas.width - radius - 1)
        mask = _paint_object(rng, image, canvas, self.family, self.classes[label], cy, cx, radius)
        if self.has_cue(index):
            cue, values = _cue(canvas, self.cue_kind, label)
            image[cue] = values[cue]
            mask = mask & ~cue  # the mask is the object that is still visible
        return _finish(rng, image), label, torch.from_numpy(mask)

    def has_cue(self, index: int) -> bool:
        """Whether sample ``index`` carries the spurious cue (drawn from its own stream; see the module docs)."""
        if self.cue_probability <= 0.0:
            return False
        index = _indices([index], self.num_samples)[0]
        cue_rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLITS[self.split], index, _CUE_STREAM]))
        return bool(cue_rng.random() < self.cue_probability)

    def batch(self, indices: int | Iterable[int] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Samples ``indices`` (or the first ``n``): images ``(B, 3, H, W)``, labels ``(B,)``, masks ``(B, H, W)``."""
        images, labels, masks = zip(*(self.sample(i) for i in _indices(indices, self.num_samples)), strict=True)
        return torch.stack(images), torch.tensor(labels), torch.stack(masks)

    def __getitem__(self, index: int):
        image, label, mask = self.sample(index)
        if self.augment:
            image, mask = _augment(image, mask)
        label = torch.tensor(label)
        return (image, label, mask) if self.return_mask else (image, label)


def _check_cue_and_placement(cue_probability: float, placement: str) -> tuple[float, str]:
    if not 0.0 <= float(cue_probability) <= 1.0:
        raise ValueError(f"cue_probability must be in [0, 1], got {cue_probability}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
    return float(cue_probability), placement


def _check_kinds(cue_kind: str, background: str) -> tuple[str, str]:
    if cue_kind not in CUE_KINDS:
        raise ValueError(f"unknown cue_kind {cue_kind!r}; choose one of {CUE_KINDS}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose one of {BACKGROUNDS}")
    return cue_kind, background


def _augment(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Random horizontal flip and small circular shift of ``image (3, H, W)`` and ``mask (H, W)`` together."""
    if torch.rand(()) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    limit = max(1, min(image.shape[-2:]) // 16)
    dy, dx = (int(s) for s in torch.randint(-limit, limit + 1, (2,)))
    return image.roll((dy, dx), (-2, -1)), mask.roll((dy, dx), (-2, -1))


class TwoObjectImages(Dataset):
    """Two objects of two different classes per image, side by side, with a mask each.

    Same arguments as :class:`SyntheticObjects` (objects are a little smaller so that both fit).
    ``batch`` returns images ``(B, 3, H, W)``, labels ``(B, 2)`` and masks ``(B, 2, H, W)`` bool, where
    ``masks[:, k]`` is the object of class ``labels[:, k]``.
    """

    def __init__(
        self,
        num_samples: int = 256,
        image_size: int | Sequence[int] = 32,
        family: str = "shape",
        num_classes: int | None = None,
        seed: int = 0,
    ):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.classes = class_names(family, num_classes)
        self.family, self.num_samples, self.seed = family, int(num_samples), int(seed)
        self.image_size = _size(image_size)
        self._canvas = _Canvas(*self.image_size)

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """Sample ``index``: ``image (3, H, W)``, labels ``(2,)``, masks ``(2, H, W)`` bool."""
        index = _indices([index], self.num_samples)[0]
        rng = _rng(self.seed, _SPLITS["two_objects"], index)
        canvas, n = self._canvas, len(self.classes)
        first = index % n
        second = (first + 1 + int(rng.integers(n - 1))) % n
        image = _background(rng, canvas)
        h, w = canvas.height, canvas.width
        horizontal = w >= h if w != h else bool(rng.random() < 0.5)
        along, across = (w, h) if horizontal else (h, w)
        radius = rng.uniform(0.36, 0.46) * min(along / 2, across)
        centres_along = [
            rng.uniform(radius + 1, max(radius + 1, along / 2 - radius)),
            rng.uniform(min(along - radius - 1, along / 2 + radius), along - radius - 1),
        ]
        centres_across = rng.uniform(radius + 1, across - radius - 1, size=2)
        if rng.random() < 0.5:  # which class goes left/top
            centres_along.reverse()
        masks = []
        for label, a, c in zip((first, second), centres_along, centres_across, strict=True):
            cy, cx = (c, a) if horizontal else (a, c)
            masks.append(_paint_object(rng, image, canvas, self.family, self.classes[label], cy, cx, radius))
        return _finish(rng, image), torch.tensor([first, second]), torch.from_numpy(np.stack(masks))

    def batch(self, indices: int | Iterable[int] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Samples ``indices``: images ``(B, 3, H, W)``, labels ``(B, 2)``, masks ``(B, 2, H, W)``."""
        images, labels, masks = zip(*(self.sample(i) for i in _indices(indices, self.num_samples)), strict=True)
        return torch.stack(images), torch.stack(labels), torch.stack(masks)

    def __getitem__(self, index: int):
        return self.sample(index)


class SyntheticDataModule(pl.LightningDataModule):
    """Train/validation splits of :class:`SyntheticObjects` for a ``Trainer``.

    Args:
        family, num_classes, image_size, seed: as in :class:`SyntheticObjects`.
        num_train, num_val: split sizes.
        batch_size, num_workers: for the dataloaders; the train loader shuffles with its own generator
            seeded from ``seed``, so the order does not depend on the global RNG.
        val_return_mask: the validation set also yields masks ``(image, label, mask)`` (and so does the test set).
        augment: random flips and shifts on the training set.
        cue_probability: the spurious cue's probability in the training *and* validation sets (one biased
            source); the test set (``num_test`` images of the ``"test"`` split) never has it, so
            evaluating on it shows what the cue cost. See :class:`SyntheticObjects`.
        placement: where objects sit in every split, ``"random"`` or ``"centre"``.
        cue_kind, background: as in :class:`SyntheticObjects` (``background`` in every split).

    Example:
        >>> data = SyntheticDataModule(family="texture", num_classes=4)
        >>> data.setup("fit")
        >>> images, labels, masks = data.val_set.batch(8)
        >>> biased = SyntheticDataModule(family="texture", cue_probability=0.9)  # test_set stays cue-free
    """

    def __init__(
        self,
        family: str = "shape",
        num_classes: int | None = 4,
        image_size: int | Sequence[int] = 32,
        num_train: int = 2048,
        num_val: int = 256,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_return_mask: bool = False,
        augment: bool = False,
        cue_probability: float = 0.0,
        placement: str = "random",
        num_test: int = 512,
        cue_kind: str = "colour",
        background: str = "default",
    ):
        super().__init__()
        self.classes = class_names(family, num_classes)
        if int(batch_size) < 1 or int(num_workers) < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0; got {batch_size}, {num_workers}")
        self.family, self.image_size, self.seed = family, _size(image_size), int(seed)
        self.num_train, self.num_val, self.num_test = int(num_train), int(num_val), int(num_test)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.val_return_mask, self.augment = val_return_mask, augment
        self.cue_probability, self.placement = _check_cue_and_placement(cue_probability, placement)
        self.cue_kind, self.background = _check_kinds(cue_kind, background)
        self.train_set: SyntheticObjects | None = None
        self.val_set: SyntheticObjects | None = None
        self.test_set: SyntheticObjects | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        common = dict(image_size=self.image_size, family=self.family, num_classes=len(self.classes), seed=self.seed,
                      placement=self.placement, background=self.background)
        biased = dict(common, cue_probability=self.cue_probability, cue_kind=self.cue_kind)
        if self.train_set is None:
            self.train_set = SyntheticObjects(self.num_train, split="train", augment=self.augment, **biased)
        if self.val_set is None:
            self.val_set = SyntheticObjects(self.num_val, split="val", return_mask=self.val_return_mask, **biased)
        if self.test_set is None:
            self.test_set = SyntheticObjects(self.num_test, split="test", return_mask=self.val_return_mask, **common)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def test_dataloader(self) -> DataLoader:
        """The cue-free test split (``num_test`` images)."""
        self.setup("test")
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
