"""JSON Merge Patch (RFC 7386): the RFC's own examples, purity, idempotence and the `changed` flag."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graft_trio.state.merge_patch import apply_merge_patch, json_equal, merge_patch

# RFC 7386 Appendix A, verbatim, plus the Go original's array case (it concatenated; RFC replaces).
RFC_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ({"data": [1, 2]}, {"data": [3, 4]}, {"data": [3, 4]}),  # upstream appended: [1, 2, 3, 4]
    ({"n": 1}, {"n": False}, {"n": False}),  # an explicit false replaces (upstream: mergo's empty rules)
    ({"n": 1}, {"n": 0}, {"n": 0}),
    ({"s": "x"}, {"s": ""}, {"s": ""}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC_EXAMPLES)
def test_rfc_7386_examples(target: Any, patch: Any, expected: Any) -> None:
    assert json.dumps(merge_patch(target, patch), sort_keys=True) == json.dumps(expected, sort_keys=True)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=3),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from("abcd"), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(json_values, json_values)
def test_merge_is_pure_idempotent_and_reports_changes(target: Any, patch: Any) -> None:
    target_before, patch_before = copy.deepcopy(target), copy.deepcopy(patch)
    result, changed = apply_merge_patch(target, patch)
    assert json_equal(target, target_before) and json_equal(patch, patch_before), "an argument was mutated"
    again, changed_again = apply_merge_patch(result, patch)
    assert json_equal(again, result), "applying the same patch twice must give the same document"
    assert not changed_again
    assert changed == (not json_equal(result, target))
    if not changed:
        assert result is target  # nothing copied when nothing changes


def test_unchanged_subtrees_are_shared_not_copied() -> None:
    big = {"keep": {"deep": list(range(100))}, "x": 1}
    result = merge_patch(big, {"x": 2})
    assert result == {"keep": {"deep": list(range(100))}, "x": 2}
    assert result["keep"] is big["keep"]
    assert big["x"] == 1


@pytest.mark.parametrize(("left", "right"), [(1, True), (1, 1.0), (0, False), ({"a": 1}, {"a": True}), ([1], [1.0])])
def test_json_equal_does_not_confuse_types(left: Any, right: Any) -> None:
    assert not json_equal(left, right)
    assert apply_merge_patch({"v": left}, {"v": right})[1]


def test_json_equal_ignores_key_order() -> None:
    assert json_equal({"a": 1, "b": [1, {"c": None}]}, {"b": [1, {"c": None}], "a": 1})
