"""The shortcut check: notice that a model reads a small spurious cue instead of the objects, from its maps and
its own forward (``docs/methods.md``, "Shortcut statistic"). Pure functions usable without a Trainer; the
callback's alarm (:class:`~lightning_xai.callbacks.ExplanationMonitor`) only calls them and routes the result.

- :mod:`.transplant`: the causal transplant check (the alarm's rate);
- :mod:`.stamps`: whether a probe's region is a stamp of its class among labelled references;
- :mod:`.agreement`: the auxiliary agreement statistic and the with-masks helpers;
- :mod:`.alarm`: the alarm's state machine;
- :mod:`.pictures`: the evidence and region pictures;
- :mod:`.audit`: :func:`check_shortcut`, the check on a finished model.
"""

from lightning_xai.shortcut.agreement import (
    DEFAULT_FRACTION,
    ShortcutScore,
    energy_distribution,
    object_drift,
    object_share,
    shortcut_score,
)
from lightning_xai.shortcut.alarm import (
    DEFAULT_PATIENCE,
    DEFAULT_PATIENCE_WITH_REFERENCES,
    DEFAULT_THRESHOLD,
    DONORS_PER_CARRIER,
    ShortcutAlarm,
    ShortcutEvent,
    carriers_needed,
    explained_epochs,
)
from lightning_xai.shortcut.audit import ShortcutCheck, check_shortcut
from lightning_xai.shortcut.stamps import (
    DEFAULT_MATCH_TOLERANCE,
    DEFAULT_STAMP_MARGIN,
    region_distances,
    region_match_shares,
    stamp_regions,
    stamped_carriers,
)
from lightning_xai.shortcut.transplant import (
    DEFAULT_REGION,
    TransplantResult,
    paste,
    recurring_regions,
    top_regions,
    transplant_check,
    transplant_pairs,
)

__all__ = [
    "DEFAULT_FRACTION",
    "DEFAULT_PATIENCE",
    "DEFAULT_PATIENCE_WITH_REFERENCES",
    "DEFAULT_REGION",
    "DEFAULT_MATCH_TOLERANCE",
    "DEFAULT_STAMP_MARGIN",
    "DEFAULT_THRESHOLD",
    "DONORS_PER_CARRIER",
    "ShortcutAlarm",
    "ShortcutCheck",
    "ShortcutEvent",
    "ShortcutScore",
    "TransplantResult",
    "carriers_needed",
    "check_shortcut",
    "energy_distribution",
    "explained_epochs",
    "object_drift",
    "object_share",
    "paste",
    "recurring_regions",
    "region_distances",
    "region_match_shares",
    "shortcut_score",
    "stamp_regions",
    "stamped_carriers",
    "top_regions",
    "transplant_check",
    "transplant_pairs",
]
