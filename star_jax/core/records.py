"""Validated records: JSON objects held to declared fields, with types and bounds.

This module owns the one way files' JSON objects (landmark scheme files, model descriptions,
export sidecars) are checked before anything is built from them. A record is described by
`Rule`s, one per field (its type, whether it is required, bounds, allowed values), given
directly or read from a dataclass's fields (`rules_from_dataclass`); `check_record` returns
the checked values and raises the caller's error class with one line naming the file, the
field and what is wrong. Only the standard library is used: the light runtime imports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from star_jax.errors import UsageError

# The JSON types a rule may ask for, and how a message calls them.
KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
         "list": "a list", "object": "a JSON object", "any": "a value"}


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field may hold.

  `low` / `high` bound numbers (inclusive; `low_open` excludes `low`) and the length of strings
  and lists; `choices` lists the allowed values; `nullable` also accepts null (None).
  """
  kind: str
  required: bool = False
  default: Any = None
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  choices: tuple | None = None
  nullable: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown rule kind {self.kind!r}; known: {', '.join(KINDS)}")

  def wanted(self) -> str:
    """'an integer from 1 to 16', 'a number in (0, 1]', 'one of float32, bfloat16', ..."""
    if self.choices is not None:
      text = f"one of {', '.join(map(str, self.choices))}"
    else:
      text = KINDS[self.kind]
      if self.kind in ("int", "float") and (self.low is not None or self.high is not None):
        if self.low_open or self.kind == "float":
          text += (f" in {'(' if self.low_open else '['}{_bound(self.low, '-inf')}, "
                   f"{_bound(self.high, 'inf')}]")
        elif self.high is None:
          text += f" of at least {self.low}"
        else:
          text += f" from {self.low} to {self.high}"
      elif self.kind in ("str", "list") and self.low:
        text = "a non-empty string" if self.kind == "str" and self.low == 1 else (
            f"{text} of at least {self.low} {'characters' if self.kind == 'str' else 'items'}")
    return text + (" or null" if self.nullable else "")


def _bound(value: float | None, missing: str) -> str:
  return missing if value is None else repr(value)


def _short(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def problem(value: Any, rule: Rule) -> str | None:
  """What is wrong with `value` under `rule` ('must be ..., got ...'), None when it conforms."""
  if value is None and rule.nullable:
    return None
  ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
        "list": lambda v: isinstance(v, (list, tuple)), "object": lambda v: isinstance(v, Mapping),
        "any": lambda v: True}[rule.kind](value)
  if ok and rule.choices is not None:
    ok = value in rule.choices
  elif ok and rule.kind in ("int", "float"):
    ok = ((rule.low is None or (value > rule.low if rule.low_open else value >= rule.low))
          and (rule.high is None or value <= rule.high))
  elif ok and rule.kind in ("str", "list"):
    ok = ((rule.low is None or len(value) >= rule.low)
          and (rule.high is None or len(value) <= rule.high))
  return None if ok else f"must be {rule.wanted()}, got {_short(value)}"


def check_value(value: Any, rule: Rule, where: str, label: str,
                error: Callable[[str], Exception] = UsageError) -> Any:
  """`value` unchanged when it conforms, else `error("{where}: {label} must be ..., got ...")`."""
  what = problem(value, rule)
  if what is not None:
    raise error(f"{where}: {label} {what}")
  return value


def check_record(data: Any, rules: Mapping[str, Rule], where: str, *,
                 error: Callable[[str], Exception] = UsageError,
                 label: Callable[[str], str] = str, extra: bool = False) -> dict[str, Any]:
  """The checked fields of `data` (a JSON object), defaults filled in for absent optional ones.

  `rules` names every field `data` may hold, unless `extra` (then other fields are kept as they
  are: records of later versions may add some); `label(name)` is how a message names a field.
  Refuses, one line each: `data` not an object, unknown fields, a missing required field, a
  value of the wrong type or out of its bounds.
  """
  if not isinstance(data, Mapping):
    raise error(f"{where}: not a JSON object")
  unknown = sorted(map(str, set(data) - set(rules)))
  if unknown and not extra:
    raise error(f"{where}: unknown field(s) {_short(', '.join(unknown), 200)[1:-1]}; known: "
                f"{', '.join(sorted(rules))}")
  out = {name: data[name] for name in data if name not in rules}
  for name, rule in rules.items():
    if name in data:
      out[name] = check_value(data[name], rule, where, label(name), error)
    elif rule.required:
      raise error(f"{where}: missing field {name!r}")
    else:
      out[name] = rule.default
  return out


def rules_from_dataclass(cls: type, overrides: Mapping[str, Rule] | None = None,
                         skip: Any = ()) -> dict[str, Rule]:
  """A rule per field of dataclass `cls`, its kind read from the field's default (bool, int,
  float, str, None -> a nullable string, tuple -> a list); `overrides` replaces the inferred
  rule of the fields it names (bounds, choices); fields in `skip` are left out."""
  overrides = dict(overrides or {})
  rules = {}
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    if field.name in overrides:
      rules[field.name] = overrides[field.name]
      continue
    default = field.default
    if default is dataclasses.MISSING:
      rules[field.name] = Rule("any", required=True)
    elif isinstance(default, bool):
      rules[field.name] = Rule("bool", default=default)
    elif isinstance(default, int):
      rules[field.name] = Rule("int", default=default)
    elif isinstance(default, float):
      rules[field.name] = Rule("float", default=default)
    elif isinstance(default, str) or default is None:
      rules[field.name] = Rule("str", default=default, nullable=True)
    elif isinstance(default, tuple):
      rules[field.name] = Rule("list", default=default)
    else:
      rules[field.name] = Rule("any", default=default)
  return rules
