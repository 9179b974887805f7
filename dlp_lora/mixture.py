"""A fixed adapter mixture {adapter name: weight}, and the one rule every entry point applies to it.

    mixture = Mixture({"math": 0.7, "de_en": 0.3}, adapters=bank.names)   # MixtureError if it breaks the rule
    ids, weights = mixture.bank_ids(bank.names)                           # ((0, 2), (0.7, 0.3))

The rule (``use_mixture``, ``dlp-lora generate/export-mixture --mixture``, ``export_mixture`` and the
server's ``mixture`` field all build a :class:`Mixture`, so they accept and refuse the same inputs
with the same message):

- a mixture is a non-empty mapping {adapter name: weight}, every name an adapter of the bank;
- a weight is a real number (``True`` / ``False`` are refused), finite, with
  ``|weight| <= MAX_MIXTURE_WEIGHT`` (100);
- negative weights are allowed: task negation (subtracting an adapter's behaviour) is an established
  use, as in PEFT's ``add_weighted_adapter`` and LoRAHub, and ``sum_k w_k B_k A_k`` is exact for
  any sign;
- zero weights are dropped (they add nothing; the names are kept in ``dropped``), and a mixture
  whose weights are all zero is refused: it is the base model, not a mixture. (``use_mixture``
  takes ``{}`` for a row that uses no adapter: a choice of no mixture, never a Mixture.)

Weights are used as given, never renormalised (each adapter's own scaling is already in the bank).
The bound keeps a weight far inside float32 (the op's weight dtype): 1e38 would be finite as a
Python float and overflow to inf in the kernel, and no meaningful mixture weighs an adapter 100x.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence

__all__ = ["MAX_MIXTURE_WEIGHT", "Mixture", "MixtureError"]

MAX_MIXTURE_WEIGHT = 100.0


class MixtureError(ValueError):
    """A mixture breaks the rule. ``detail`` completes a sentence whose subject is the mixture; each
    entry point names it its own way (``mixture``, ``--mixture``, ``use_mixture: mixtures[1]``)."""

    def __init__(self, detail: str, subject: str = "mixture"):
        super().__init__(f"{subject} {detail}")
        self.detail = detail

    def named(self, subject: str) -> MixtureError:
        """The same error about the mixture called ``subject``."""
        return MixtureError(self.detail, subject)


class Mixture(Mapping[str, float]):
    """An immutable, validated {adapter name: weight} with no zero weight, in the order given.

    ``adapters``: the names the mixture may use (the bank's). A Mapping, so it compares equal to
    the dict it was built from (less its zero weights) and goes wherever a dict did.
    """

    __slots__ = ("_weights", "dropped")

    def __init__(self, weights: Mapping[str, float], adapters: Sequence[str]):
        if not isinstance(weights, Mapping):
            raise MixtureError(f"must be a mapping {{adapter name: weight}}, got {type(weights).__name__}")
        if not weights:
            raise MixtureError("is empty: name at least one adapter with its weight")
        _check_names(weights, adapters)
        for name, weight in weights.items():
            if not _is_weight(weight):
                raise MixtureError(
                    f"weight of {_show(name)} must be a finite number with |weight| <= "
                    f"{MAX_MIXTURE_WEIGHT:g} (negative weights are allowed), got {_show(weight)}")
        self._weights = {name: float(w) for name, w in weights.items() if w != 0}
        self.dropped = tuple(name for name, w in weights.items() if w == 0)
        if not self._weights:
            raise MixtureError(f"has only zero weights ({_show(dict(weights))}): that is the base model, "
                               "not a mixture")

    def __getitem__(self, name: str) -> float:
        return self._weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __repr__(self) -> str:
        return f"Mixture({self._weights})"

    def in_order(self, names: Sequence[str]) -> list[tuple[str, float]]:
        """[(name, weight)] in the order of ``names`` (the bank's): one mixture, one order."""
        self._check_names(names)
        return [(name, self._weights[name]) for name in names if name in self._weights]

    def bank_ids(self, names: Sequence[str]) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(adapter ids in ``names``, weights), in the mixture's order: what the op's routing takes."""
        self._check_names(names)
        index = {name: i for i, name in enumerate(names)}
        return tuple(index[name] for name in self._weights), tuple(self._weights.values())

    def _check_names(self, names: Sequence[str]) -> None:
        _check_names(self._weights, names)


def _check_names(weights: Mapping, adapters: Sequence[str]) -> None:
    unknown = [name for name in weights if name not in adapters]
    if unknown:
        shown = ", ".join(_show(name) for name in unknown[:4]) + (f" and {len(unknown) - 4} more"
                                                                 if len(unknown) > 4 else "")
        raise MixtureError(f"names unknown adapter(s) [{shown}]; the adapters are {list(adapters)}")


def _is_weight(value) -> bool:
    """A real number (not a bool), finite, within the bound; a huge integer is not (it overflows float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value) and abs(value) <= MAX_MIXTURE_WEIGHT
    except OverflowError:
        return False


def _show(value, limit: int = 60) -> str:
    """repr(value) cut to ``limit`` characters: a refusal echoes what it refuses, not megabytes of it."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
