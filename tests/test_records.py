"""The validated-record helper: each rule refuses what it should, in one line naming the field."""

import dataclasses

import pytest

from star_jax.core import records
from star_jax.errors import CheckpointError, UsageError

RULES = {
    "name": records.Rule("str", required=True, low=1),
    "count": records.Rule("int", low=1, high=16, default=4),
    "ratio": records.Rule("float", low=0, high=1, low_open=True, default=0.5),
    "flag": records.Rule("bool", default=False),
    "kind": records.Rule("str", choices=("a", "b")),
    "items": records.Rule("list", nullable=True),
}


def test_a_conforming_record_gets_its_defaults():
  assert records.check_record({"name": "x", "ratio": 1}, RULES, "f.json") == {
      "name": "x", "count": 4, "ratio": 1, "flag": False, "kind": None, "items": None}


@pytest.mark.parametrize("data, message", [
    ([1], "f.json: not a JSON object"),
    ({"count": 2}, "f.json: missing field 'name'"),
    ({"name": "x", "other": 1, "more": 2}, "f.json: unknown field(s) more, other; known: count, "
                                            "flag, items, kind, name, ratio"),
    ({"name": ""}, "f.json: name must be a non-empty string, got ''"),
    ({"name": "x", "count": 17}, "f.json: count must be an integer from 1 to 16, got 17"),
    ({"name": "x", "count": True}, "f.json: count must be an integer from 1 to 16, got True"),
    ({"name": "x", "count": 2.0}, "f.json: count must be an integer from 1 to 16, got 2.0"),
    ({"name": "x", "ratio": 0}, "f.json: ratio must be a number in (0, 1], got 0"),
    ({"name": "x", "flag": 1}, "f.json: flag must be true or false, got 1"),
    ({"name": "x", "kind": "c"}, "f.json: kind must be one of a, b, got 'c'"),
    ({"name": "x", "items": {}}, "f.json: items must be a list or null, got {}"),
])
def test_each_rule_refuses_in_one_line(data, message):
  with pytest.raises(UsageError) as info:
    records.check_record(data, RULES, "f.json")
  assert str(info.value) == message


def test_the_callers_error_class_and_field_label():
  with pytest.raises(CheckpointError, match=r"^m.json: field 'count' of model 'x' must be an "
                                            r"integer from 1 to 16, got 'a'$"):
    records.check_record({"name": "x", "count": "a"}, RULES, "m.json", error=CheckpointError,
                         label="field {!r} of model 'x'".format)


def test_extra_fields_are_kept_when_allowed():
  out = records.check_record({"name": "x", "later": [1]}, RULES, "f.json", extra=True)
  assert out["later"] == [1]


def test_rules_from_a_dataclass_follow_the_defaults():
  @dataclasses.dataclass
  class Thing:
    size: int
    width: int = 3
    closed: bool = False
    label: str | None = None
    points: tuple = ()

  rules = records.rules_from_dataclass(Thing, {"width": records.Rule("int", low=1, high=8)})
  assert rules == {"size": records.Rule("any", required=True),
                   "width": records.Rule("int", low=1, high=8),
                   "closed": records.Rule("bool", default=False),
                   "label": records.Rule("str", nullable=True),
                   "points": records.Rule("list", default=())}
  with pytest.raises(UsageError, match="missing field 'size'"):
    records.check_record({}, rules, "t.json")
