"""Explain a trained ViT checkpoint on a folder of images and save the heat maps as PNG overlays.

Uses the functional API (``lightning_xai.explain``) on a ``ViTClassifier`` checkpoint such as the one
``examples/train_vit.py`` writes and prints at the end (``<output-dir>/<run name>/version_N/checkpoints/last.ckpt``;
it stores the class names, so predictions are printed by name):

    python examples/train_vit.py                     # prints "Checkpoint (with the class names): ..."
    python examples/explain_checkpoint.py --checkpoint runs/texture-vit_tiny_patch16_224/version_0/checkpoints/last.ckpt
    python examples/explain_checkpoint.py --checkpoint model.ckpt --images my_pictures/ --methods gradtoken gae
    python examples/explain_checkpoint.py --checkpoint model.ckpt --target-class 2 --output /tmp/class2

Without ``--images``, 8 generated sample images (the training data's kind) are written to ``<output>/inputs/``
first and explained. Each image gives ``<output>/<method>/<stem>.png``: the original next to its overlay. The
default ``<output>`` is ``explanations/`` in the checkpoint's run folder (beside its ``checkpoints/`` folder), not
the current folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import lightning_xai
from lightning_xai.demos import MEAN, STD, SyntheticObjects, ViTClassifier
from lightning_xai.demos.cli import HelpFormatter, print_path
from lightning_xai.render import caption, grid, overlay, save_png

#: File types read from ``--images`` (matched case-insensitively, searched recursively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
NUM_SAMPLES = 8


def build_parser() -> argparse.ArgumentParser:
    """The command line of this example (``--help`` shows every option with its default)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt of a lightning_xai.demos.ViTClassifier")
    parser.add_argument("--images", default=None,
                        help=f"folder of images ({', '.join(IMAGE_EXTENSIONS)}; searched recursively); "
                             f"default: {NUM_SAMPLES} generated samples written to <output>/inputs/")
    parser.add_argument("--methods", nargs="+", default=["gradtoken", "c2f"],
                        help=f"explanation methods, of: {', '.join(lightning_xai.available_methods())}")
    parser.add_argument("--targets", default="pred",
                        help="class to explain: 'pred' (the predicted class) or a class index")
    parser.add_argument("--target-class", type=int, default=None,
                        help="explain this class index for every image (same as --targets N; default: as --targets)")
    parser.add_argument("--output", default=None,
                        help="where the PNG files go (default: explanations/ in the checkpoint's run folder)")
    parser.add_argument("--batch-size", type=int, default=16, help="images explained at once")
    parser.add_argument("--class-names", default=None,
                        help="comma-separated class names (default: from the checkpoint if it has them, else indices)")
    parser.add_argument("--family", choices=["shape", "texture"], default="texture",
                        help="kind of generated sample images when --images is not given")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated sample images")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    unknown = [m for m in args.methods if m not in lightning_xai.available_methods()]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(map(repr, unknown))}; "
                     f"choose from {', '.join(lightning_xai.available_methods())}")
    if args.target_class is not None:
        args.targets = args.target_class
    elif str(args.targets).lower() in ("pred", "predicted", "none"):
        args.targets = None
    else:
        try:
            args.targets = int(args.targets)
        except ValueError:
            parser.error(f"--targets must be 'pred' or a class index, got {args.targets!r}")
    return args


def load_model(path: str | Path) -> ViTClassifier:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: checkpoint not found: {path}")
    model = ViTClassifier.load_from_checkpoint(str(path), map_location="cpu")
    return model.eval()


def default_output(checkpoint: str | Path) -> Path:
    """``<run folder>/explanations``: the folder above ``checkpoints/`` when the checkpoint lies in one (as
    Lightning saves them), else the checkpoint's own folder."""
    folder = Path(checkpoint).resolve().parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "explanations"


def image_size(model: ViTClassifier) -> tuple[int, int]:
    size = model.hparams.get("image_size", 32)
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def resolve_class_names(args: argparse.Namespace, model: ViTClassifier) -> list[str]:
    num_classes = int(model.hparams.get("num_classes", 0)) or model.model.num_classes
    if args.class_names:
        names = [name.strip() for name in args.class_names.split(",")]
        if len(names) != num_classes:
            raise SystemExit(f"error: --class-names has {len(names)} names for a model with {num_classes} classes")
        return names
    stored = model.hparams.get("class_names")
    if stored is not None and len(stored) == num_classes:
        return [str(name) for name in stored]
    return [str(i) for i in range(num_classes)]


def find_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"error: no images in {folder} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def write_samples(folder: Path, size: tuple[int, int], family: str, num_classes: int, seed: int) -> list[Path]:
    """Write generated test-split images as PNG files (what the example model was trained on)."""
    dataset = SyntheticObjects(NUM_SAMPLES, image_size=size, family=family,
                               num_classes=min(max(num_classes, 2), 6), seed=seed, split="test")
    images, labels, _ = dataset.batch(NUM_SAMPLES)
    pixels = (images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).clamp(0, 1)
    pixels = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [save_png(pixel, folder / f"sample{i}_{dataset.classes[label]}.png")
            for i, (pixel, label) in enumerate(zip(pixels, labels.tolist(), strict=True))]


def output_stems(files: list[Path], root: Path | None) -> list[str]:
    """File stems, or (when two files share a stem) the path below ``root`` joined with ``_``."""
    stems = [path.stem for path in files]
    if len(set(stems)) == len(stems) or root is None:
        return stems
    return ["_".join(path.relative_to(root).with_suffix("").parts) for path in files]


def load_images(files: list[Path], size: tuple[int, int]) -> torch.Tensor:
    """RGB, resized (bilinear) to ``size``, in ``[0, 1]``, normalised with MEAN/STD: ``(B, 3, H, W)``."""
    height, width = size
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((width, height), Image.BILINEAR)
        except OSError as err:
            raise SystemExit(f"error: cannot read image {path}: {err}") from None
        arrays.append(np.asarray(rgb, dtype=np.float32) / 255.0)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = load_model(args.checkpoint)
    size = image_size(model)
    names = resolve_class_names(args, model)
    if args.targets is not None and not 0 <= args.targets < len(names):
        raise SystemExit(f"error: target class {args.targets} is out of range for a model with {len(names)} classes")
    output = Path(args.output) if args.output is not None else default_output(args.checkpoint)
    if args.images is None:
        files = write_samples(output / "inputs", size, args.family, len(names), args.seed)
        print(f"No --images given: wrote {len(files)} generated {args.family} samples to "
              f"{(output / 'inputs').resolve()} and explaining those.")
    else:
        files = find_images(args.images)
    stems = dict(zip(files, output_stems(files, None if args.images is None else Path(args.images)), strict=True))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)

    summary: dict[Path, tuple[str, float]] = {}
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images = load_images(chunk, size).to(device)
        with torch.no_grad():
            probs = model(images).softmax(-1).cpu()
        for path, p in zip(chunk, probs, strict=True):
            summary[path] = (names[int(p.argmax())], float(p.max()))
        for method in args.methods:
            result = lightning_xai.explain(model, images, method=method, targets=args.targets)
            originals = overlay(images, result.maps[:, 0], alpha=0.0, mean=MEAN, std=STD)
            overlays = overlay(images, result.maps[:, 0], mean=MEAN, std=STD)
            for i, path in enumerate(chunk):
                target, prob = int(result.targets[i, 0]), float(result.probs[i, 0])
                tiles = caption(np.stack([originals[i], overlays[i]]),
                                [path.name, f"{names[target]} p={prob:.2f}"])
                save_png(grid(tiles, ncols=2), output / method / f"{stems[path]}.png")

    root = Path(args.images) if args.images is not None else output / "inputs"
    shown = {path: path.relative_to(root).as_posix() for path in files}
    width = max(len("file"), *(len(text) for text in shown.values()))
    name_width = max(len("predicted"), *(len(name) for name in names))
    print()
    print(f"{'file':<{width}}  {'predicted':<{name_width}}  probability")
    for path, (name, prob) in summary.items():
        print(f"{shown[path]:<{width}}  {name:<{name_width}}  {prob:.3f}")
    explained = "predicted class" if args.targets is None else f"class {names[args.targets]}"
    print(f"\nExplained the {explained} of {len(files)} image(s) with {', '.join(args.methods)}.")
    for method in args.methods:
        print_path(f"{method} overlays", output / method)


if __name__ == "__main__":
    main(sys.argv[1:])
