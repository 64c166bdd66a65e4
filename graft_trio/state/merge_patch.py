"""JSON Merge Patch (RFC 7386): how a step's result is merged into its workflow's state.

Mappings merge recursively, ``None`` deletes a key, everything else (lists included) replaces the target.
Applying the same patch twice gives the same document, which is what makes a re-executed step harmless
where the Go original appended arrays twice.

Both functions are pure: neither argument is changed, and subtrees the patch does not touch are shared
between the old and the new document, so a patch costs what it touches, not what the state holds.
"""

from __future__ import annotations

from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """The document `target` becomes once `patch` is applied (RFC 7386 section 2)."""
    return apply_merge_patch(target, patch)[0]


def apply_merge_patch(target: Any, patch: Any) -> tuple[Any, bool]:
    """`merge_patch(target, patch)` and whether the result differs from `target` as a JSON value.

    When nothing changes the result is `target` itself. "Differs" compares JSON types strictly: ``1``,
    ``1.0`` and ``true`` are three different values, since they serialise differently.
    """
    if not isinstance(patch, dict):
        if json_equal(target, patch):
            return target, False
        return patch, True
    if isinstance(target, dict):
        result: dict[str, Any] | None = None  # copied on the first change only
        source: dict[str, Any] = target
        changed = False
    else:
        result = {}
        source = result
        changed = True  # a non-object target becomes an object, even if the patch then adds nothing
    for key, value in patch.items():
        if value is None:
            if key in source:
                if result is None:
                    result = dict(target)
                del result[key]
                changed = True
            continue
        old = source.get(key)
        new, member_changed = apply_merge_patch(old, value)
        if member_changed or key not in source:
            if result is None:
                result = dict(target)
            result[key] = new
            changed = True
    if result is None:
        return target, False
    return result, changed


def json_equal(left: Any, right: Any) -> bool:
    """Equality of two JSON values that does not confuse ``true`` with ``1`` or ``1`` with ``1.0``."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return len(left) == len(right) and all(
            key in right and json_equal(value, right[key]) for key, value in left.items()
        )
    if isinstance(left, list):
        return len(left) == len(right) and all(json_equal(a, b) for a, b in zip(left, right, strict=True))
    return bool(left == right)
