"""The shortcut alarm's state machine: one transplant check per explained event in, an alarm raised once per run
out (when, for ``patience`` consecutive explained events, a probe was a stamped carrier, or without labelled
references the rate held at or above a threshold)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: Alarm level of the transplant rate (see ``docs/methods.md``, "Shortcut statistic", for how it was measured).
DEFAULT_THRESHOLD = 0.25
#: Consecutive explained events with the rate at or above the threshold before the alarm fires.
DEFAULT_PATIENCE = 2
#: The same when the check also has labelled references, so that each event needs a stamped carrier (see
#: ``docs/methods.md``, "Stamped carriers"): that evidence does not come and go by chance as the rate does.
DEFAULT_PATIENCE_WITH_REFERENCES = 1

#: With labelled references, an event counts toward the alarm when it holds at least one stamped carrier per this many
#: donors tried (rounded up: 1 for the 8 probes alone, 2 for 8 probes and 24 explained references). Chance stamps grow
#: with the number of donors; measured in ``docs/methods.md``, "Stamped carriers".
DONORS_PER_CARRIER = 16


def carriers_needed(donors: int) -> int:
    """Stamped carriers an event needs among ``donors`` donors (see :data:`DONORS_PER_CARRIER`); at least 1."""
    return max(1, math.ceil(int(donors) / DONORS_PER_CARRIER))


def explained_epochs(count: int) -> str:
    """``"1 explained epoch"``, ``"2 explained epochs"``."""
    return f"{count} explained epoch{'' if count == 1 else 's'}"


@dataclass
class ShortcutEvent:
    """An alarm: ``method``'s transplant rate stayed at or above ``threshold`` for ``patience`` explained epochs
    ending at ``epoch``; ``rates`` are those epochs' values, ``probes`` the donor probes whose own rate reached
    the threshold at ``epoch``; ``carriers`` the probes that were stamped carriers at ``epoch`` (``None``: the check had
    no labelled references), ``reference_carriers`` the labelled references that were (explained as extra donors)."""

    method: str
    epoch: int
    rates: list[float]
    threshold: float
    patience: int
    probes: list[int] = field(default_factory=list)
    carriers: list[int] | None = None
    reference_carriers: list[int] = field(default_factory=list)

    def carrier_names(self) -> str:
        """``"probes [1, 3] and references [4]"``: the stamped carriers at ``epoch``."""
        parts = [f"{what} {indices}" for what, indices in (("probes", self.carriers or []),
                                                             ("references", self.reference_carriers)) if indices]
        return " and ".join(parts)

    def message(self) -> str:
        values = ", ".join(f"{r:.2f}" for r in self.rates)
        if self.carriers is not None:
            return (f"shortcut alarm for {self.method!r} at epoch {self.epoch}: the small region the maps of "
                    f"{self.carrier_names()} point at is a stamp of their class (the same pixels at the same place in "
                    f"labelled images of that class and not of the others) and, pasted at its place into labelled "
                    f"images of other classes, turns at least a third of them into that class, for "
                    f"{explained_epochs(self.patience)}; share of all pairs that follow their donor: {values}. The "
                    f"model may be reading a spurious cue (a watermark, a tag, a border mark) instead of the objects.")
        return (f"shortcut alarm for {self.method!r} at epoch {self.epoch}: pasting the small region each probe's "
                f"map points at into the probes of other classes turned their prediction into the donor's class in "
                f"a share of the pairs at or above {self.threshold:.2f} ({values}) for "
                f"{explained_epochs(self.patience)}; probes whose region carries their class: {self.probes}. The "
                f"model may be reading a spurious cue (a watermark, a tag, a border mark) instead of the objects.")


class ShortcutAlarm:
    """Fires once per run when the rate stays at or above ``threshold`` for ``patience`` consecutive explained
    events. An event whose rate is ``nan`` (undefined: the probes were explained for one class) breaks the streak.

    Example:
        >>> alarm = ShortcutAlarm("gradtoken", threshold=0.3, patience=2)
        >>> [alarm.update(epoch, s) is not None for epoch, s in enumerate([0.1, 0.4, 0.5, 0.6])]
        [False, False, True, False]
    """

    def __init__(self, method: str, threshold: float = DEFAULT_THRESHOLD, patience: int = DEFAULT_PATIENCE):
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"shortcut threshold must be in [0, 1] (a share of pairs), got {threshold}")
        if int(patience) < 1 or int(patience) != patience:
            raise ValueError(f"shortcut patience must be a positive int, got {patience}")
        self.method, self.threshold, self.patience = method, float(threshold), int(patience)
        self.streak: list[float] = []
        self.fired_at: int | None = None

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def update(self, epoch: int, rate: float, probes: list[int] | None = None, carriers: list[int] | None = None,
               reference_carriers: list[int] | None = None, needed: int = 1) -> ShortcutEvent | None:
        """Record ``rate`` of explained epoch ``epoch``; return the event the first time the alarm fires.
        ``carriers``: the event's stamped carriers when the check had labelled references (``None``: it had none).
        With them an event counts when it holds ``needed`` stamped carriers or more (probes, and references in
        ``reference_carriers``; see :func:`carriers_needed`), whatever the rate (the evidence is the carrier; the rate,
        a share of all pairs, also counts the probes that carry no mark); without them, when the rate is at or above
        the threshold and defined (there were pairs)."""
        if carriers is None:
            counts = not math.isnan(rate) and rate >= self.threshold
        else:
            counts = len(carriers) + len(reference_carriers or []) >= max(1, int(needed))
        if not counts:
            self.streak = []
            return None
        self.streak.append(float(rate))
        if self.fired or len(self.streak) < self.patience:
            return None
        self.fired_at = int(epoch)
        return ShortcutEvent(self.method, int(epoch), self.streak[-self.patience:], self.threshold, self.patience,
                             list(probes or []), None if carriers is None else list(carriers),
                             list(reference_carriers or []))

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "threshold": self.threshold, "patience": self.patience,
                "streak": list(self.streak), "fired_at": self.fired_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = [float(s) for s in state.get("streak", [])]
        self.fired_at = state.get("fired_at")
