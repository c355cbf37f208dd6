"""What each ``xai/`` scalar means, in one place, and the TensorBoard Custom Scalars layout built from it.

Every scalar the callbacks log has an entry in :data:`SCALARS`: a short chart title and a description (what it
measures, its range, what is good). TensorBoard shows the description beside the chart (written once per tag, as
the summary's metadata, see :class:`~lightning_xai.callbacks.sinks.TensorBoardSink`); W&B gets all of them in
the run's config under :data:`CONFIG_KEY`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from lightning_xai.callbacks import keys


@dataclass(frozen=True)
class Scalar:
    """How one scalar is presented: ``title`` names its chart, ``text`` says what it measures, its range and
    which values are good."""

    title: str
    text: str


#: Per scalar name (the last part of its tag): ``xai/<method>/<name>`` or ``xai/<name>``.
SCALARS: dict[str, Scalar] = {
    "target_probability": Scalar(
        "probability of the explained class",
        "Mean probability, over the probes, of the class each map explains (softmax; sigmoid for binary and "
        "multi-label heads; with targets='pred': how confident the model is). Range 0 to 1; rises as the model "
        "learns.",
    ),
    "probe_accuracy": Scalar(
        "probe accuracy",
        "Share of the probe images whose predicted class is their label. Range 0 to 1; higher is better. "
        "Computed on the few probes only: noisier than the validation accuracy.",
    ),
    "probe_exact_match": Scalar(
        "probe exact match (multi-label)",
        "Share of the probe images whose every label decision is right (sigmoid >= 0.5 exactly for their "
        "positive labels). Range 0 to 1; higher is better. Multi-label heads only.",
    ),
    "probe_label_accuracy": Scalar(
        "probe label accuracy (multi-label)",
        "Share of right (probe, class) decisions (sigmoid >= 0.5 for a positive label, below for a negative one). "
        "Range 0 to 1; higher is better; the share of negatives is what always saying 'no' scores.",
    ),
    "entropy": Scalar(
        "entropy (spread of the map)",
        "Normalised entropy of each map seen as a distribution over the pixels, averaged over the probes. "
        "1 = spread evenly over the whole image, 0 = all on one pixel. Falling means the maps focus; a map on a "
        "whole object stays well above 0.",
    ),
    "similarity_prev": Scalar(
        "similarity to the previous event",
        "Pearson correlation of each map with the same probe's map at the previous explanation event, averaged. "
        "Range -1 to 1; near 1 = the maps have settled, low or falling late in training = the model changed "
        "where it looks. Not logged at the first event.",
    ),
    "iou": Scalar(
        "IoU with the object mask",
        "Intersection over union of the map, thresholded at its own mean, with the probe's object mask "
        "(probes with masks only). Range 0 to 1; higher = the map covers the object and little else.",
    ),
    "energy_pointing_game": Scalar(
        "share of the map on the object",
        "Energy pointing game: share of each map's positive mass inside the object mask, averaged (probes with "
        "masks only). Range 0 to 1; the object's share of the image is chance level, higher is better.",
    ),
    "class_discrimination": Scalar(
        "class discrimination",
        "On two-object probes explained for both classes: energy of each class's map on its own object divided "
        "by its energy on both objects. Range 0 to 1; 0.5 = cannot tell the classes apart, higher is better.",
    ),
    "deletion_auc": Scalar(
        "deletion AUC",
        "Target probability as the most relevant pixels are removed first, area under the curve (range 0 to 1). "
        "Lower is better: removing what the map points at should destroy the prediction.",
    ),
    "insertion_auc": Scalar(
        "insertion AUC",
        "Target probability as the most relevant pixels are inserted first into a blurred image, area under the "
        "curve (range 0 to 1). Higher is better: what the map points at should restore the prediction.",
    ),
    "shortcut": Scalar(
        "shortcut statistic",
        "Share of each probe's map energy inside the small region where the maps of the other classes' probes "
        "agree, averaged over classes. 0.05 = maps spread evenly (chance), near 1 = every class's maps sit on "
        "one spot (a spurious cue). Lower is better; the alarm fires at shortcut_threshold.",
    ),
    "shortcut_rate": Scalar(
        "shortcut rate",
        "Share of probe pairs of different classes whose prediction follows the donor's class when the donor "
        "map's top region is pasted into the other image. Range 0 to 1; near 0 is healthy, the alarm fires "
        "when it stays above shortcut_threshold.",
    ),
    "shortcut_threshold": Scalar(
        "shortcut alarm threshold",
        "The shortcut rate at or above which the alarm counts an event (the shortcut_threshold option; "
        "constant, drawn as a line beside the rate).",
    ),
    "shortcut_agreement": Scalar(
        "shortcut agreement (auxiliary)",
        "Share of each probe's map energy inside the top 5 % of the other classes' mean map. Range 0 to 1, "
        "0.05 = chance; high = the classes' maps agree on one spot. Auxiliary to the shortcut rate.",
    ),
}

#: Where W&B runs hold the descriptions: ``run.config["xai_descriptions"] = {tag: text}``.
CONFIG_KEY = "xai_descriptions"

#: Charts drawn together in one Custom Scalars chart: ``{chart name: scalar names}`` (the first names the chart).
TOGETHER: dict[str, tuple[str, ...]] = {"shortcut_rate": ("shortcut_rate", "shortcut_threshold")}


def describe(tag: str) -> Scalar | None:
    """The presentation of scalar ``tag`` (``xai/<method>/<name>`` or ``xai/<name>``), ``None`` for tags that
    are not ours."""
    if not tag.startswith(f"{keys.ROOT}/"):
        return None
    return SCALARS.get(tag.rsplit("/", 1)[-1])


def description(tag: str) -> str:
    """The description TensorBoard and W&B show for ``tag`` (``""`` when none is known)."""
    scalar = describe(tag)
    return f"**{scalar.title}**. {scalar.text}" if scalar is not None else ""


def _pattern(tags: Iterable[str]) -> str:
    """A regular expression that matches exactly ``tags`` (Custom Scalars' charts select tags by regex)."""
    return "^(" + "|".join(re.escape(tag) for tag in tags) + ")$"


def scalar_layout(tags: Iterable[str], name: str | None = None) -> dict[str, dict[str, list]]:
    """The Custom Scalars layout of the ``xai/`` scalars in ``tags``: one category per method
    (``xai/<method>``, charts in :data:`SCALARS` order) and one for the probes (``xai``); the shortcut rate and
    its threshold share one chart. ``similarity_prev`` is included with ``entropy`` (it starts one event later).
    ``tags`` are unprefixed; a monitor's ``name`` puts categories and charts under ``xai/<name>/``
    (:func:`.keys.named`).

    Returns:
        ``{category: {chart title: ["Multiline", [tag regex]]}}``, as ``SummaryWriter.add_custom_scalars`` takes.
    """
    tags = {tag for tag in tags if describe(tag) is not None}
    tags |= {tag.rsplit("/", 1)[0] + "/similarity_prev" for tag in tags if tag.endswith("/entropy")}
    grouped: dict[str, set[str]] = {}
    for tag in tags:
        grouped.setdefault(tag.rsplit("/", 1)[0], set()).add(tag)
    layout: dict[str, dict[str, list]] = {}
    for category in sorted(grouped, key=lambda c: (c != keys.ROOT, c)):
        present = grouped[category]
        drawn: set[str] = set()
        charts: dict[str, list] = {}
        for scalar_name, scalar in SCALARS.items():
            tag = f"{category}/{scalar_name}"
            if tag not in present or tag in drawn:
                continue
            members = [f"{category}/{member}" for member in TOGETHER.get(scalar_name, (scalar_name,))]
            members = [member for member in members if member in present]
            drawn.update(members)
            title = scalar.title + (" vs threshold" if len(members) > 1 else "")
            pattern = _pattern(keys.named(member, name) for member in members)
            charts[f"{tag.split('/', 1)[1]}: {title}"] = ["Multiline", [pattern]]
        layout[keys.named(category + "/", name).rstrip("/")] = charts
    return layout
