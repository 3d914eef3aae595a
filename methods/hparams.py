"""Typed, ranged hyper-parameters: each method declares a `schema` beside its `defaults`.

Every resolved config (defaults <- card <- suite <- `--set`) is checked against it before any run,
and stored in normalised form, so `lr=1e-3` and `lr=0.001` are the same run, and `epochs=-5` or
`n_ctx=0` is refused with the valid range instead of being stored under a config that lies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import yaml

from harness.errors import HarnessError

NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Param:
    kind: type  # int, float, str, bool or list
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    optional: bool = False  # None allowed (e.g. "by shots")
    item: type | None = None  # list items' kind (int or float)
    length: int | None = None  # list length

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            bounds = [f">= {self.ge}" if self.ge is not None else "", f"> {self.gt}" if self.gt is not None else "",
                      f"<= {self.le}" if self.le is not None else "", f"< {self.lt}" if self.lt is not None else ""]
            kind = f"a list of {f'{self.length} ' if self.length else ''}{self.item.__name__}s" if self.kind is list else f"a{'n' if self.kind is int else ''} {self.kind.__name__}"
            text = " ".join([kind, " and ".join(b for b in bounds if b)]).strip()
        return text + (" or null" if self.optional else "")


def parse_value(text: str):
    """A `--set` value: YAML, except that anything that looks like a number is one (YAML 1.1 reads
    1e-3 as text)."""
    text = text.strip()
    if NUMBER.match(text):
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _number(value, kind: type):
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str) and NUMBER.match(value.strip()):
        value = parse_value(value)
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise ValueError
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise ValueError


def _in_range(value, p: Param) -> bool:
    return not (
        (p.ge is not None and value < p.ge) or (p.gt is not None and value <= p.gt)
        or (p.le is not None and value > p.le) or (p.lt is not None and value >= p.lt)
    )


def normalise(method: str, key: str, value, p: Param):
    """The value in canonical form, or HarnessError naming the key, the value and the valid range."""
    def bad():
        return HarnessError(f"{method}: hyper-parameter {key}={value!r} is invalid; it must be {p.describe()}.")

    if value is None:
        if p.optional:
            return None
        raise bad()
    try:
        if p.kind in (int, float):
            out = _number(value, p.kind)
            ok = _in_range(out, p)
        elif p.kind is bool:
            out = value if isinstance(value, bool) else {"true": True, "false": False}[str(value).lower()]
            ok = True
        elif p.kind is list:
            items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
            out = [_number(v, p.item) for v in items]
            ok = (p.length is None or len(out) == p.length) and all(_in_range(v, p) for v in out)
        else:
            out = value if isinstance(value, str) else None
            ok = out is not None
    except (ValueError, KeyError, TypeError):
        raise bad() from None
    if not ok or (p.choices and out not in p.choices):
        raise bad()
    return out


def validate(method: str, hparams: dict, schema: dict[str, Param]) -> dict:
    """Every hyper-parameter that has a schema entry, normalised; the others as given."""
    return {k: normalise(method, k, v, schema[k]) if k in schema else v for k, v in hparams.items()}
