"""Class names: id2label tables, --labels names/ids (case-insensitive, synonyms, close matches, ambiguity)."""

from __future__ import annotations

import pytest

from ditdeploy.config.labels import DIGIT_NAMES, display_names, for_model, normalize, parse_spec, resolve
from ditdeploy.errors import DitDeployError

TABLE = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "volcano", 3: "crane", 4: "crane"}


def test_resolve_names_ids_and_synonyms():
    assert resolve("Golden Retriever, 2, tinca  TINCA,volcano", TABLE, 6) == [1, 2, 0, 2]
    assert resolve("5", TABLE, 6) == [5]  # an unnamed class by id
    assert parse_spec(" 7 , golden retriever ") == [7, "golden retriever"]


@pytest.mark.parametrize("spec,words", [
    ("golden retreiver", ["unknown class name 'golden retreiver'", "close matches: golden retriever (1)"]),
    ("zebra", ["no close match", "0..5"]),
    ("crane", ["ambiguous", "3 (crane), 4 (crane)", "pass the id"]),
    ("1,6,-1", ["labels [6, -1] out of range", "0..5"]),
    (" , ", ["empty"]),
])
def test_resolve_errors_are_one_line(spec, words):
    with pytest.raises(DitDeployError) as e:
        resolve(spec, TABLE, 6)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_names_need_a_table():
    with pytest.raises(DitDeployError, match="no class names.*comma-separated class ids 0..9"):
        resolve("golden retriever", None, 10)


def test_tables():
    assert normalize({"1": " b ", "0": "a"}) == {0: "a", 1: "b"}
    with pytest.raises(DitDeployError, match="has classes 0..1"):
        normalize({"2": "x"}, 2)
    assert for_model({"id2label": {"0": "x"}}, "custom", 3) == {0: "x"}
    assert for_model({}, "digits", 10) == DIGIT_NAMES and for_model({}, "XL/2", 1000) is None
    assert display_names(TABLE, 6) == ["tench", "golden retriever", "volcano", "crane", "crane", "5"]
