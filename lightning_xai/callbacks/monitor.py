"""``ExplanationMonitor``: explain a fixed probe batch every epoch and log the maps to every logger."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_xai import render
from lightning_xai.adapters import OutputTransform, ViTLocator, find_vit, geometry
from lightning_xai.callbacks.evolution import SIMILARITIES, evolution_scalars
from lightning_xai.callbacks.probes import Probe, find_dataset, from_dataset, from_tensors, preserved_rng
from lightning_xai.callbacks.sinks import EpochRecord, PngSink, Sink, sinks_for
from lightning_xai.explainers import Explainer, Explanation, create_explainer
from lightning_xai.explainers.base import explanation_mode
from lightning_xai.explainers.registry import resolve_methods
from lightning_xai.metrics import deletion_insertion
from lightning_xai.validation import check_images, resolve_targets, to_logits

STAGES = ("validation", "train")
TARGET_MODES = ("pred", "label", "topk")
ON_ERROR = ("warn", "raise")
HISTORY_LIMIT = 64  # timeline frames kept per method; older ones are thinned, first and last always kept


class ExplanationMonitor(Callback):
    """Explain a fixed probe batch with GradToken, C2F-Explainer or any registered method while training,
    and log overlays, a per-method timeline and evolution scalars to every logger of the ``Trainer``.

    TensorBoard gets images with ``global_step = epoch``; W&B gets ``wandb.Image``s, a per-epoch table and
    the probe images once; any other logger (or none) gets PNG files under the run's log directory.
    Only rank 0 computes and logs. Explaining never changes training: RNG states, train/eval modes,
    ``requires_grad`` flags and gradients are left as they were, and a failure becomes a warning.

    Args:
        methods: a registry name, a list of names, or ``{name: options}`` (default GradToken and C2F).
        probe_images: ``(P, C, H, W)`` probe images in the model's input space; when omitted, ``num_probes``
            samples are drawn once (seeded) from the ``probe_split`` dataloader's dataset.
        probe_labels: ``(P,)`` labels for ``targets="label"`` (and the probe accuracy scalar).
        probe_masks: ``(P, H, W)`` object masks (or ``(P, K, H, W)``, one per target) for localisation scalars.
        num_probes: how many samples to draw when ``probe_images`` is not given.
        probe_split: ``"val"`` or ``"train"``: the dataset to draw probes from.
        seed: seed of the probe draw.
        targets: ``"pred"`` (predicted class, each epoch), ``"label"``, ``"topk"`` (the ``top_k`` predicted
            classes), a class index, or a list of class indices (several per image).
        top_k: number of predicted classes explained with ``targets="topk"``.
        stage: ``"validation"`` (at ``on_validation_epoch_end``) or ``"train"`` (``on_train_epoch_end``).
        every_n_epochs: explain when ``(epoch + 1) % every_n_epochs == 0``.
        explain_at_fit_start: also explain once before any training (logged as the ``init`` baseline).
        similarity: ``"pearson"`` or ``"cosine"``: the map-to-previous-epoch similarity scalar.
        deletion_insertion: also log deletion/insertion AUC (costs ``~2 * 51`` forwards per probe).
        save_raw: save the raw (unnormalised) maps per epoch as ``.pt`` files.
        on_error: ``"warn"`` (default: the run goes on) or ``"raise"``.
        timeline_columns: most epochs shown side by side in the timeline image.
        mean, std: the input normalisation, to show the probe images in true colour (default: min-max).
        cmap, alpha: colour map and opacity of the overlays.
        class_names: names to print on the tiles instead of class indices.
        vit, output_transform: where the ViT is in the LightningModule, and how to get logits from its
            forward output (see :func:`lightning_xai.explain`).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_xai.callbacks import ExplanationMonitor
        >>> monitor = ExplanationMonitor(methods=["gradtoken", "c2f"], num_probes=8)
        >>> trainer = pl.Trainer(max_epochs=5, callbacks=[monitor])  # then trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        methods: str | Sequence[str] | Mapping[str, Mapping[str, Any]] = ("gradtoken", "c2f"),
        *,
        probe_images: Tensor | None = None,
        probe_labels: Tensor | None = None,
        probe_masks: Tensor | None = None,
        num_probes: int = 8,
        probe_split: str = "val",
        seed: int = 0,
        targets: str | int | Sequence[int] = "pred",
        top_k: int = 2,
        stage: str = "validation",
        every_n_epochs: int = 1,
        explain_at_fit_start: bool = False,
        similarity: str = "pearson",
        deletion_insertion: bool = False,
        save_raw: bool = False,
        on_error: str = "warn",
        timeline_columns: int = 12,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        cmap: str = "jet",
        alpha: float = 0.5,
        class_names: Sequence[str] | None = None,
        vit: ViTLocator = None,
        output_transform: OutputTransform = None,
    ) -> None:
        super().__init__()
        self.methods = resolve_methods(methods)
        self._check_choice("stage", stage, STAGES)
        self._check_choice("probe_split", probe_split, ("val", "train"))
        self._check_choice("similarity", similarity, SIMILARITIES)
        self._check_choice("on_error", on_error, ON_ERROR)
        for name, value in (("num_probes", num_probes), ("every_n_epochs", every_n_epochs), ("top_k", top_k),
                            ("timeline_columns", timeline_columns)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(targets, str):
            self._check_choice("targets", targets, TARGET_MODES)
        elif isinstance(targets, bool) or not (
            isinstance(targets, int)
            or (isinstance(targets, Sequence) and targets and all(isinstance(t, int) for t in targets))
        ):
            raise ValueError(
                f"targets must be one of {TARGET_MODES}, a class index or a list of class indices, got {targets!r}"
            )
        if targets == "label" and probe_images is not None and probe_labels is None:
            raise ValueError("targets='label' needs probe_labels when probe_images are given")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.user_probe = None if probe_images is None else from_tensors(probe_images, probe_labels, probe_masks)
        self.num_probes, self.probe_split, self.seed = num_probes, probe_split, seed
        self.targets, self.top_k, self.stage, self.every_n_epochs = targets, top_k, stage, every_n_epochs
        self.explain_at_fit_start, self.similarity = explain_at_fit_start, similarity
        self.deletion_insertion, self.save_raw, self.on_error = deletion_insertion, save_raw, on_error
        self.timeline_columns, self.mean, self.std, self.cmap, self.alpha = timeline_columns, mean, std, cmap, alpha
        self.class_names = list(class_names) if class_names is not None else None
        self.vit, self.output_transform = vit, output_transform
        self.probe: Probe | None = self.user_probe
        self._explainers: dict[str, Explainer] = {}
        self._sinks: list[Sink] = []
        self._previous: dict[str, Tensor] = {}
        self._history: dict[str, list[tuple[str, np.ndarray]]] = {}
        self._explained_epochs: list[int] = []
        self._probes_uploaded = False
        self.last_scalars: dict[str, float] = {}
        """The scalars of the latest explanation event, ``{"xai/<method>/<name>": value}``."""

    def timeline(self, method: str) -> np.ndarray:
        """The current timeline of ``method``: uint8 ``(H, W, 3)``, rows = probes, columns = explained epochs."""
        if method not in self._history:
            raise KeyError(f"no explanations of {method!r} yet; explained so far: {sorted(self._history)}")
        history = self._history[method]
        return render.timeline(
            [entry[1] for entry in history], [entry[0] for entry in history], max_columns=self.timeline_columns,
            row_labels=[f"#{i}" for i in range(len(history[0][1]))],
        )

    @staticmethod
    def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(methods=tuple(self.methods), stage=self.stage)

    # -- set-up: every misconfiguration raises here, before the first epoch ----------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        find_vit(pl_module, self.vit)  # raises a clear error when no ViT is found
        self._explainers = {
            name: create_explainer(name, pl_module, vit=self.vit, output_transform=self.output_transform, **options)
            for name, options in self.methods.items()
        }
        if self.probe is None:
            self._draw_probe(trainer, required=False)
        if self.probe is not None:
            self._check_probe(pl_module)
        if trainer.is_global_zero:
            self._sinks = sinks_for(trainer, trainer.loggers)

    def _draw_probe(self, trainer: pl.Trainer, required: bool) -> None:
        dataset = find_dataset(trainer, self.probe_split)
        if dataset is None:
            if required:
                raise ValueError(
                    f"no {self.probe_split} dataset to draw probes from: pass probe_images=... to the callback, "
                    f"or probe_split={'train' if self.probe_split == 'val' else 'val'!r}"
                )
            return
        self.probe = from_dataset(dataset, self.num_probes, self.seed)

    def _check_probe(self, pl_module: pl.LightningModule) -> None:
        probe = self.probe
        vit = find_vit(pl_module, self.vit)
        check_images(probe.images, vit)
        geometry(vit, tuple(probe.images.shape[-2:]))
        if self.targets == "label" and probe.labels is None:
            raise ValueError("targets='label' but the probe samples carry no labels: pass probe_labels=...")
        with preserved_rng(), explanation_mode(pl_module), torch.no_grad():
            logits = to_logits(pl_module(probe.images[:1].to(pl_module.device)), self.output_transform)
        self._resolve(logits.expand(len(probe.images), -1), probe)  # raises for out-of-range targets

    def _resolve(self, logits: Tensor, probe: Probe) -> Tensor:
        """Targets ``(P, K)`` for this epoch from the probe's logits ``(P, num_classes)``."""
        if self.targets == "pred":
            return logits.argmax(-1, keepdim=True)
        if self.targets == "topk":
            return logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices
        if self.targets == "label":
            return resolve_targets(probe.labels, logits)
        if isinstance(self.targets, int):
            return resolve_targets(self.targets, logits)
        return resolve_targets(torch.tensor([list(self.targets)] * len(logits)), logits)

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        probe = None if self.probe is None else self.probe.state_dict()
        return {"probe": probe, "explained_epochs": self._explained_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe") is not None:
            self.probe = Probe.from_state_dict(state_dict["probe"])
        self._explained_epochs = list(state_dict.get("explained_epochs", []))

    # -- hooks ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.explain_at_fit_start and trainer.current_epoch == 0 and not self._explained_epochs:
            self._run(trainer, pl_module, baseline=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "train" and self._due(trainer):
            self._run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == "validation" and not trainer.sanity_checking and self._due(trainer):
            self._run(trainer, pl_module)

    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        if trainer.state.fn != "fit":  # trainer.validate(): explain whenever asked
            return True
        return (epoch + 1) % self.every_n_epochs == 0 and epoch not in self._explained_epochs

    # -- one explanation event --------------------------------------------------------------------------------
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, baseline: bool = False) -> None:
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        try:
            with preserved_rng():
                if self.probe is None:
                    self._draw_probe(trainer, required=True)
                    self._check_probe(pl_module)
                record = self._explain(trainer, pl_module, epoch, baseline)
            for sink in self._sinks:
                sink.write(record)
        except Exception as err:  # noqa: BLE001 - an explanation failure must never lose the training run
            self._fail(err, "logging", epoch)
        if not baseline and trainer.state.fn == "fit":
            self._explained_epochs.append(epoch)

    def _fail(self, err: Exception, method: str, epoch: int) -> None:
        if self.on_error == "raise":
            raise err
        warnings.warn(
            f"lightning-xai: explaining with {method!r} failed at epoch {epoch}: {type(err).__name__}: {err}. "
            "Training continues (set on_error='raise' to stop instead).",
            RuntimeWarning,
            stacklevel=2,
        )

    def _explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, baseline: bool) -> EpochRecord:
        probe = self.probe
        images = probe.images.to(pl_module.device)
        with explanation_mode(pl_module), torch.no_grad():
            logits = to_logits(pl_module(images), self.output_transform).float()
        targets = self._resolve(logits, probe)
        results: dict[str, Explanation] = {}
        for name, explainer in self._explainers.items():
            try:
                results[name] = explainer(images, targets)
            except Exception as err:  # noqa: BLE001 - one failing method must not stop the others
                self._fail(err, name, epoch)
        label = "init" if baseline else f"ep {epoch}"
        scalars = self._scalars(pl_module, images, logits, targets, probe, results, baseline)
        self.last_scalars = dict(scalars)
        tiles = {name: self._overlays(images, result) for name, result in results.items()}
        grids = {name: self._grid(images, result, tiles[name]) for name, result in results.items()}
        timelines = {name: self._timeline(name, label, tiles[name][:, 0]) for name in results}
        if self.save_raw:
            self._save_raw(trainer, results, label.replace(" ", "_"))
        record = EpochRecord(
            epoch=epoch,
            global_step=trainer.global_step,
            grids=grids,
            timelines={} if baseline else timelines,  # the baseline is the first column of the next one
            scalars=scalars,
            rows=self._rows(targets, logits, tiles),
            probe_tiles=None if self._probes_uploaded else render.overlay(
                images, torch.zeros(images.shape[0], *images.shape[-2:]), alpha=0.0, mean=self.mean, std=self.std
            ),
            baseline=baseline,
        )
        self._probes_uploaded = True
        return record

    def _scalars(self, pl_module, images, logits, targets, probe, results, baseline) -> dict[str, float]:
        prefix = "xai/init/" if baseline else "xai/"
        probs = logits.softmax(-1)
        out = {f"{prefix}target_probability": float(probs.gather(1, targets).mean())}
        if probe.labels is not None and probe.labels.dim() == 1:
            out[f"{prefix}probe_accuracy"] = float((logits.argmax(-1).cpu() == probe.labels).float().mean())
        for name, result in results.items():
            maps = result.maps.cpu()
            previous = None if baseline else self._previous.get(name)
            for key, value in evolution_scalars(maps, previous, probe.masks, self.similarity).items():
                out[f"{prefix}{name}/{key}"] = value
            if self.deletion_insertion:
                with explanation_mode(pl_module):
                    curves = deletion_insertion(
                        lambda x: to_logits(pl_module(x), self.output_transform), images, result.maps[:, 0].to(images),
                        targets[:, 0],
                    )
                out[f"{prefix}{name}/deletion_auc"] = float(curves["deletion_auc"].mean())
                out[f"{prefix}{name}/insertion_auc"] = float(curves["insertion_auc"].mean())
            self._previous[name] = maps
        return out

    def _name(self, target: int) -> str:
        if self.class_names is not None and 0 <= target < len(self.class_names):
            return self.class_names[target]
        return str(target)

    def _overlays(self, images: Tensor, result: Explanation) -> np.ndarray:
        """uint8 ``(P, K, h, w, 3)`` overlays of each probe's map for each target."""
        count, k = result.targets.shape
        repeated = images.repeat_interleave(k, 0).float().cpu()
        tiles = render.overlay(
            repeated, result.maps.flatten(0, 1), alpha=self.alpha, cmap=self.cmap, mean=self.mean, std=self.std
        )
        return tiles.reshape(count, k, *tiles.shape[1:])

    def _grid(self, images: Tensor, result: Explanation, tiles: np.ndarray) -> np.ndarray:
        """Rows = probes; columns = the probe image, then one captioned overlay per target."""
        count, k = result.targets.shape
        originals = render.overlay(
            images.float().cpu(), torch.zeros(count, *images.shape[-2:]), alpha=0.0, mean=self.mean, std=self.std
        )
        texts = [
            f"{self._name(int(t))} p={float(p):.2f}"
            for t, p in zip(result.targets.flatten(), result.probs.flatten(), strict=True)
        ]
        captioned = render.caption(tiles.reshape(-1, *tiles.shape[2:]), texts).reshape(count, k, -1, *tiles.shape[3:])
        firsts = render.caption(originals, [f"probe {i}" for i in range(count)])
        rows = np.concatenate([firsts[:, None], captioned], axis=1)
        return render.grid(rows.reshape(-1, *rows.shape[2:]), ncols=k + 1)

    def _timeline(self, name: str, label: str, tiles: np.ndarray) -> np.ndarray:
        history = self._history.setdefault(name, [])
        history.append((label, tiles))
        if len(history) > HISTORY_LIMIT:  # thin the middle, keep the first and the newest
            del history[1:-1:2]
        return self.timeline(name)

    def _rows(self, targets: Tensor, logits: Tensor, tiles: dict[str, np.ndarray]):
        probs = logits.softmax(-1).gather(1, targets).cpu()
        return [
            (p, int(targets[p, k]), self._name(int(targets[p, k])), float(probs[p, k]),
             {m: t[p, k] for m, t in tiles.items()})
            for p in range(targets.shape[0])
            for k in range(targets.shape[1])
        ]

    def _save_raw(self, trainer: pl.Trainer, results: dict[str, Explanation], label: str) -> None:
        png_roots = [sink.root for sink in self._sinks if isinstance(sink, PngSink)]
        root = png_roots[0] if png_roots else Path(trainer.log_dir or trainer.default_root_dir) / "xai"
        for name, result in results.items():
            path = root / "raw" / name / f"{label}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"raw": result.raw.cpu(), "targets": result.targets.cpu(), "probs": result.probs.cpu()}, path)


class GradTokenMonitor(ExplanationMonitor):
    """:class:`ExplanationMonitor` for GradToken only; GradToken's options are keyword arguments here.

    Example:
        >>> from lightning_xai.callbacks import GradTokenMonitor
        >>> monitor = GradTokenMonitor(layers="all", targets="topk", top_k=2)
    """

    def __init__(self, *, layers: Any = "all", per_layer_norm: bool = False, objective: str = "logit", **kwargs: Any):
        options = {"layers": layers, "per_layer_norm": per_layer_norm, "objective": objective}
        super().__init__(methods={"gradtoken": options}, **kwargs)


class C2FMonitor(ExplanationMonitor):
    """:class:`ExplanationMonitor` for C2F-Explainer only; C2F's options are keyword arguments here.

    Example:
        >>> from lightning_xai.callbacks import C2FMonitor
        >>> monitor = C2FMonitor(granularity="clusters", num_probes=4)
    """

    def __init__(self, *, granularity: str = "draws", batch_size: int = 64, **kwargs: Any):
        names = ("thresholds", "draws", "levels", "noise_sigma", "cluster_threshold")
        options = {"granularity": granularity, "batch_size": batch_size}
        options.update({name: kwargs.pop(name) for name in names if name in kwargs})
        super().__init__(methods={"c2f": options}, **kwargs)
