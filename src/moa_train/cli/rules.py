"""The rule types of the validation tables (``cli/validate.py``): one :class:`Rule` per key, built with
``Int``, ``Float``, ``Bool``, ``Choice``, ``Str``, ``Floats`` or ``Strs``, and the safe config reads the
checks use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from moa_train.errors import MoATrainError
from moa_train.rundir import show_value as _show

ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """One key of a group: its type, range or choices, and whether null is allowed."""

    key: str
    kind: str  # int | float | bool | choice | str | floats | strs
    lo: float | None = None  # inclusive lower bound
    hi: float | None = None  # inclusive upper bound
    above: float | None = None  # exclusive lower bound
    below: float | None = None  # exclusive upper bound
    choices: tuple[Any, ...] = ()
    null: bool = False
    length: int | None = None  # floats/strs: exact list length
    also: tuple[Any, ...] = ()  # literal values accepted besides the kind (e.g. "auto")

    def check(self, value: Any, where: str) -> None:
        if value is None:
            if not self.null:
                raise MoATrainError(f"{where} must be set ({self.expected()}); got null")
            return
        if any(value == a and type(value) is type(a) for a in self.also):
            return
        if not self._ok(value):
            if self.kind == "choice":
                choices = ", ".join(_show(c) for c in self.choices)
                raise MoATrainError(f"{where}={_show(value)} is not known; choose one of {choices}")
            raise MoATrainError(f"{where}={_show(value)} is invalid: expected {self.expected()}")

    def _ok(self, value: Any) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.kind == "str":
            return isinstance(value, str) and value != ""
        if self.kind in ("floats", "strs"):
            if not isinstance(value, list | tuple | ListConfig):
                return False
            if self.length is not None and len(value) != self.length:
                return False
            item = Rule(
                "", "float" if self.kind == "floats" else "str", self.lo, self.hi, self.above, self.below
            )
            return all(v is not None and item._ok(v) for v in value)
        if self.kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            return False
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                return False
        return _in_range(value, self.lo, self.hi, self.above, self.below)

    def expected(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(_show(c) for c in self.choices)
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = "a non-empty string"
        else:
            noun = {
                "int": "an integer",
                "float": "a number",
                "floats": "a list of numbers",
                "strs": "a list of strings",
            }
            text = noun[self.kind]
            if self.length is not None:
                text += f" of length {self.length}"
            bounds = [
                f">= {self.lo:g}" if self.lo is not None else "",
                f"> {self.above:g}" if self.above is not None else "",
                f"<= {self.hi:g}" if self.hi is not None else "",
                f"< {self.below:g}" if self.below is not None else "",
            ]
            bounds = [b for b in bounds if b]
            if bounds:
                text += (" (each " if self.kind == "floats" else " ") + " and ".join(bounds)
                text += ")" if self.kind == "floats" else ""
        text += "".join(f" or {_show(a)}" for a in self.also)
        return text + (" or null" if self.null else "")


def _in_range(v: float, lo: float | None, hi: float | None, above: float | None, below: float | None) -> bool:
    return (
        (lo is None or v >= lo)
        and (hi is None or v <= hi)
        and (above is None or v > above)
        and (below is None or v < below)
    )


def Int(  # noqa: N802
    key: str, lo: float | None = None, hi: float | None = None, null: bool = False, also: tuple[Any, ...] = ()
) -> Rule:
    return Rule(key, "int", lo=lo, hi=hi, null=null, also=also)


def Float(  # noqa: N802
    key: str,
    lo: float | None = None,
    hi: float | None = None,
    above: float | None = None,
    below: float | None = None,
    null: bool = False,
) -> Rule:
    return Rule(key, "float", lo=lo, hi=hi, above=above, below=below, null=null)


def Bool(key: str, null: bool = False) -> Rule:  # noqa: N802
    return Rule(key, "bool", null=null)


def Choice(key: str, *choices: Any, null: bool = False) -> Rule:  # noqa: N802
    return Rule(key, "choice", choices=choices, null=null)


def Str(key: str, null: bool = False) -> Rule:  # noqa: N802
    return Rule(key, "str", null=null)


def Floats(key: str, length: int | None = None, lo: float | None = None, below: float | None = None) -> Rule:  # noqa: N802
    return Rule(key, "floats", lo=lo, below=below, length=length)


def Strs(key: str) -> Rule:  # noqa: N802
    return Rule(key, "strs")


# ----------------------------------------------------------------------------------------------------
# Reading a composed config
# ----------------------------------------------------------------------------------------------------


def get(node: Any, key: str, default: Any = ABSENT) -> Any:
    """A value without resolving errors: missing keys and ``???`` give ``default``; bad interpolations raise."""
    try:
        value = OmegaConf.select(node, key, default=default, throw_on_missing=False)
    except Exception as exc:  # an interpolation that does not resolve
        raise MoATrainError(f"{key}: {exc}") from None
    if OmegaConf.is_missing(node, key) if has(node, key) else False:
        return default
    return value


def has(node: Any, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    container = OmegaConf.select(node, parent, default=None) if parent else node
    return isinstance(container, DictConfig) and leaf in container
