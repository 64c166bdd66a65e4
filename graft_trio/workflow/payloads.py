"""The typing layer: the node registry, and the conversion of JSON payloads to the user's types and back.

A node's state and config types come from its type parameters (``class Greeter(Node[GreeterState,
GreeterConfig])``, found through subclasses of subclasses) or else from the annotations of `execute`'s state
and config parameters; a slot that names neither is `Any` (the JSON passes through). cattrs does the work,
with a converter made stricter than its defaults, because every payload is JSON that other code wrote:

- **Strict scalars.** A ``str`` field takes only a string, ``int`` an integer (or an integral float),
  ``float`` a number, ``bool`` a boolean, a list or tuple field an array (never a string or an object);
  cattrs alone would turn ``"false"`` into ``True`` and ``"abc"`` into ``["a", "b", "c"]``.
- **Unknown keys are ignored, never lost.** Structuring ignores keys the type does not declare (the state
  is one document that every node of the workflow writes to; a config written by a newer member may carry
  fields an older one does not know). A node sees its typed view of the state, and the engine merges only
  the patch the node returns (`result_patch`), so the document is never replaced by a narrower view.
- **Absent and null are the same in a state document.** JSON Merge Patch (RFC 7386) cannot store a null:
  a ``None`` in a patch deletes the key. So a state document made from an attrs/dataclass instance
  (`NodeResult.data`, `WorkflowTrigger.initial_state`) leaves its ``None`` fields out, at every depth:
  returning a typed instance never deletes anything, and to delete a key a node returns a mapping with
  ``None`` for it. In the other direction, a missing key for a field that accepts ``None`` and has no
  default reads as ``None``, so a typed state always reads back what was written. Configs are stored as
  they are (a ``None`` field stays ``null``); a null config for an object-shaped config type reads as ``{}``.

Payload errors are `PayloadError` (non-retryable), naming the payload, the expected type and each field by
its JSON path (``$.items[2].name``). Registration errors are `NodeRegistrationError`.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Annotated, Any, ForwardRef, Literal, TypeVar, Union, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory, list_structure_factory
from cattrs.preconf.json import make_converter

from graft_trio.workflow.types import (
    NextNode,
    Node,
    NodeConfig,
    NodeRegistrationError,
    NodeResult,
    PayloadError,
    RetryPolicy,
    WorkflowTrigger,
    is_structured_instance,
)

JSONObject = dict[str, Any]
"""A JSON object as Python holds it: str keys; values None, bool, int, float (finite), str, list, dict."""

_NoneType = type(None)
StructureHook = Callable[[Any, Any], Any]


# --- the converter -----------------------------------------------------------------------------------


class _Mismatch(TypeError):
    """A value of the wrong JSON shape for its type; the message says all there is to say."""


def _describe(value: object) -> str:
    """The JSON kind of `value` for an error message (`a string`, `an object`, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a value of type {type(value).__qualname__}"


def type_name(tp: Any) -> str:
    """A short readable name for a type (`GreeterState`, `list[Item]`, `int | None`)."""
    if tp is _NoneType or tp is None:
        return "None"
    if tp is Any:
        return "Any"
    if _is_union(tp):
        return " | ".join(type_name(argument) for argument in get_args(tp))
    origin, arguments = get_origin(tp), get_args(tp)
    if origin is not None and arguments and origin is not Literal and origin is not Annotated:
        inner = ", ".join("..." if argument is Ellipsis else type_name(argument) for argument in arguments)
        return f"{type_name(origin)}[{inner}]"
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def _structure_str(value: Any, tp: Any) -> str:
    if tp is not str:  # a subclass (a str enum): its constructor checks the value
        return tp(value)  # type: ignore[no-any-return]
    if isinstance(value, str):
        return value
    raise _Mismatch(f"expected a string, got {_describe(value)}")


def _structure_int(value: Any, tp: Any) -> int:
    if tp is not int:  # a subclass (an int enum or flag): its constructor checks the value
        return tp(value)  # type: ignore[no-any-return]
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Mismatch(f"expected an integer, got {_describe(value)}")


def _structure_float(value: Any, tp: Any) -> float:
    if tp is not float:
        return tp(value)  # type: ignore[no-any-return]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _Mismatch(f"expected a number, got {_describe(value)}")


def _structure_bool(value: Any, _tp: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Mismatch(f"expected a boolean, got {_describe(value)}")


def _structure_none(value: Any, _tp: Any) -> None:
    if value is None:
        return None
    raise _Mismatch(f"expected null, got {_describe(value)}")


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _accepts_none(tp: Any) -> bool:
    tp = _strip_annotated(tp)
    if tp is Any or tp is _NoneType or tp is None:
        return True
    return _is_union(tp) and any(_accepts_none(arg) for arg in get_args(tp))


def _origin_class(tp: Any) -> Any:
    return get_origin(tp) or tp


def _is_attrs_or_dataclass(tp: Any) -> bool:
    origin = _origin_class(tp)
    return isinstance(origin, type) and (attrs.has(origin) or dataclasses.is_dataclass(origin))


def _is_typeddict(tp: Any) -> bool:
    return typing.is_typeddict(_origin_class(tp))


def _is_mapping_type(tp: Any) -> bool:
    return _origin_class(tp) in (dict, Mapping, MutableMapping)


def _is_list_type(tp: Any) -> bool:
    origin = _origin_class(tp)
    return origin is list or (origin is MutableSequence and bool(get_args(tp)))


def _is_homogeneous_tuple_type(tp: Any) -> bool:
    args = get_args(tp)
    origin = get_origin(tp)
    if origin is tuple:
        return len(args) == 2 and args[1] is Ellipsis
    return origin is Sequence and bool(args)


def _substitute(tp: Any, bindings: Mapping[Any, Any]) -> Any:
    """`tp` with the type variables in `bindings` replaced (``list[T]`` with ``{T: int}`` is ``list[int]``)."""
    if isinstance(tp, TypeVar):
        return bindings.get(tp, tp)
    parameters = getattr(tp, "__parameters__", ())
    if parameters and not isinstance(tp, type):
        try:
            return tp[tuple(bindings.get(parameter, parameter) for parameter in parameters)]
        except TypeError:
            return tp
    return tp


def _field_types(tp: Any) -> dict[str, Any]:
    """The declared field types of an attrs class, dataclass or TypedDict (or a generic alias of one)."""
    origin = _origin_class(tp)
    bindings = dict(zip(getattr(origin, "__parameters__", ()), get_args(tp), strict=False))
    if attrs.has(origin):
        attrs.resolve_types(origin)
        fields = {field.name: field.type for field in attrs.fields(origin) if field.init}
    elif dataclasses.is_dataclass(origin):
        hints = typing.get_type_hints(origin)
        fields = {field.name: hints[field.name] for field in dataclasses.fields(origin) if field.init}
    else:
        fields = typing.get_type_hints(origin)
    return {name: _substitute(field_type, bindings) for name, field_type in fields.items()}


def _nullable_without_default(tp: Any) -> tuple[str, ...]:
    """Fields that accept None and must be given: a missing key for them reads as None."""
    origin = _origin_class(tp)
    try:
        field_types = _field_types(tp)
    except Exception:  # unresolvable annotations: cattrs reports them when it structures
        return ()
    if attrs.has(origin):
        required = {field.name for field in attrs.fields(origin) if field.init and field.default is attrs.NOTHING}
    elif dataclasses.is_dataclass(origin):
        required = {
            field.name
            for field in dataclasses.fields(origin)
            if field.init and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        }
    else:
        required = set(getattr(origin, "__required_keys__", ()))
    return tuple(name for name, field_type in field_types.items() if name in required and _accepts_none(field_type))


def _object_hook(tp: Any, base: StructureHook) -> StructureHook:
    name = type_name(tp)
    nullable = _nullable_without_default(tp)

    def structure(value: Any, target: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Mismatch(f"expected an object ({name}), got {_describe(value)}")
        missing = [field for field in nullable if field not in value]
        if missing:
            value = {**value, **dict.fromkeys(missing)}
        return base(value, target)

    return structure


def _array_hook(tp: Any, base: StructureHook) -> StructureHook:
    name = type_name(tp)

    def structure(value: Any, target: Any) -> Any:
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            raise _Mismatch(f"expected an array ({name}), got {_describe(value)}")
        return base(value, target)

    return structure


def make_payload_converter() -> cattrs.Converter:
    """A new converter with graft's rules (see the module docstring): cattrs' JSON preset, extra keys
    ignored, detailed validation, strict scalars and arrays, missing nullable fields read as None.

    Register hooks for your own leaf types on it (or on `payload_converter`, which registries use unless
    given another)."""
    converter = make_converter(forbid_extra_keys=False, detailed_validation=True)
    # Scalars go through cattrs' class dispatch (which also catches their subclasses, such as str enums).
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook_func(lambda tp: tp is _NoneType, _structure_none)

    def attrs_factory(tp: Any) -> StructureHook:
        return _object_hook(tp, converter.gen_structure_attrs_fromdict(tp))

    def typeddict_factory(tp: Any) -> StructureHook:
        return _object_hook(tp, converter.gen_structure_typeddict(tp))

    def list_factory(tp: Any) -> StructureHook:
        return _array_hook(tp, list_structure_factory(tp, converter))

    def tuple_factory(tp: Any) -> StructureHook:
        return _array_hook(tp, homogenous_tuple_structure_factory(tp, converter))

    converter.register_structure_hook_factory(_is_attrs_or_dataclass, attrs_factory)
    converter.register_structure_hook_factory(_is_typeddict, typeddict_factory)
    converter.register_structure_hook_factory(_is_list_type, list_factory)
    converter.register_structure_hook_factory(_is_homogeneous_tuple_type, tuple_factory)
    return converter


payload_converter: cattrs.Converter = make_payload_converter()
"""The converter registries use by default."""


# --- structuring ---------------------------------------------------------------------------------------


def _format_problem(exc: BaseException, tp: Any) -> str:
    if isinstance(exc, _Mismatch):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.StructureHandlerNotFoundError):
        return f"no structure hook for {type_name(exc.type_)}"
    detail = f"{type(exc).__name__}: {exc}"
    if tp is not None:
        return f"expected {type_name(tp)} ({detail})"
    return f"invalid value ({detail})"


def structure_payload(
    value: Any, tp: Any, what: str = "state", *, converter: cattrs.Converter | None = None, node: str | None = None
) -> Any:
    """`value` (JSON) as an instance of `tp`; raises `PayloadError` naming each field that does not fit.

    `value` is not copied: whatever `tp` passes through (``Any``, values of ``dict[str, Any]``) is shared.
    """
    converter = converter or payload_converter
    try:
        return converter.structure(value, tp)
    except (cattrs.ClassValidationError, cattrs.IterableValidationError) as exc:
        problems = cattrs.transform_error(exc, path="$", format_exception=_format_problem)
        raise PayloadError(what, type_name(tp), problems, node=node) from exc
    except Exception as exc:
        raise PayloadError(what, type_name(tp), [f"{_format_problem(exc, tp)} @ $"], node=node) from exc


# --- unstructuring -------------------------------------------------------------------------------------


class _NotJSON(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{message} @ {path}")
        self.path = path
        self.message = message


def _member_path(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key)}]"


def _to_json(value: Any, path: str, converter: cattrs.Converter, *, state: bool, drop_none: bool = False) -> Any:
    """A fresh JSON value for `value`; `state` drops the None members of whatever an attrs or dataclass
    instance produced (see the module docstring). Raises `_NotJSON` naming the first value that is not JSON."""
    if value is None or type(value) in (str, bool, int):
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise _NotJSON(path, f"expected a finite number, got {value}")
        return value
    if isinstance(value, dict | list | tuple):
        if isinstance(value, dict):
            result: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise _NotJSON(path, f"object keys must be strings, got {_describe(key)} {key!r}")
                if item is None and drop_none:
                    continue
                result[key] = _to_json(item, _member_path(path, key), converter, state=state, drop_none=drop_none)
            return result
        return [
            _to_json(item, f"{path}[{index}]", converter, state=state, drop_none=drop_none)
            for index, item in enumerate(value)
        ]
    if isinstance(value, Mapping):
        return _to_json(dict(value), path, converter, state=state, drop_none=drop_none)
    try:
        unstructured = converter.unstructure(value)
    except Exception as exc:
        raise _NotJSON(path, f"cannot unstructure {type(value).__name__} ({type(exc).__name__}: {exc})") from exc
    if unstructured is value:
        if isinstance(value, enum.Enum):
            return _to_json(value.value, path, converter, state=state)
        for scalar in (str, int, float):  # a subclass of a JSON scalar that cattrs passes through
            if isinstance(value, scalar) and not isinstance(value, bool):
                return _to_json(scalar(value), path, converter, state=state)
        raise _NotJSON(path, f"expected a JSON value, got {_describe(value)}")
    drop = drop_none or (state and is_structured_instance(value))
    return _to_json(unstructured, path, converter, state=state, drop_none=drop)


def unstructure_payload(
    obj: Any, what: str = "payload", *, converter: cattrs.Converter | None = None, node: str | None = None
) -> Any:
    """`obj` as a fresh JSON value, exactly (a None field is ``null``): for configs and other stored values.

    Raises `PayloadError` naming the first value (by path) that does not turn into JSON.
    """
    try:
        return _to_json(obj, "$", converter or payload_converter, state=False)
    except _NotJSON as exc:
        raise PayloadError(what, "JSON", [str(exc)], node=node) from exc


def _state_json(data: object, path: str, converter: cattrs.Converter) -> JSONObject:
    if data is None:
        return {}
    if not (isinstance(data, Mapping) or is_structured_instance(data)):
        raise _NotJSON(path, f"expected a mapping or an attrs/dataclass instance, got {_describe(data)}")
    document = _to_json(data, path, converter, state=True)
    if not isinstance(document, dict):
        raise _NotJSON(path, f"expected an object, got {_describe(document)}")
    return document


def unstructure_state(
    obj: object, what: str = "state", *, converter: cattrs.Converter | None = None, node: str | None = None
) -> JSONObject:
    """`obj` (a mapping, an attrs/dataclass instance, or None for ``{}``) as a state document or patch.

    A mapping is taken as it is (a None value deletes that key when merged); an attrs/dataclass instance
    leaves its None fields out. Raises `PayloadError` for anything that is not an object of JSON values.
    """
    try:
        return _state_json(obj, "$", converter or payload_converter)
    except _NotJSON as exc:
        raise PayloadError(what, "a JSON object", [str(exc)], node=node) from exc


def _step_json(
    name: str, config: Any, priority: int, delay: float, key: str | None, path: str, converter: cattrs.Converter
) -> JSONObject:
    return {
        "name": name,
        "config": _to_json(config, f"{path}.config", converter, state=False),
        "priority": priority,
        "delay": float(delay),
        "idempotency_key": key,
    }


def _next_node_json(next_node: NextNode, path: str, converter: cattrs.Converter) -> JSONObject:
    return _step_json(
        next_node.name,
        next_node.config,
        next_node.priority,
        next_node.delay,
        next_node.idempotency_key,
        path,
        converter,
    )


def _node_config_json(node: NodeConfig, path: str, converter: cattrs.Converter) -> JSONObject:
    return _step_json(node.name, node.config, 0, 0.0, None, path, converter)


def trigger_json(trigger: WorkflowTrigger, *, converter: cattrs.Converter | None = None) -> JSONObject:
    """The trigger as JSON for a proposal: ``{"workflow_id", "initial_state", "initial_nodes", "metadata"}``.

    `initial_state` is a state document (`unstructure_state`); each initial node has the shape of a next
    node (``{"name", "config", "priority": 0, "delay": 0.0, "idempotency_key": None}``). Raises
    `PayloadError` (what ``"trigger"``) naming the first value that is not JSON.
    """
    converter = converter or payload_converter
    try:
        return {
            "workflow_id": trigger.workflow_id,
            "initial_state": _state_json(trigger.initial_state, "$.initial_state", converter),
            "initial_nodes": [
                _node_config_json(node, f"$.initial_nodes[{index}]", converter)
                for index, node in enumerate(trigger.initial_nodes)
            ],
            "metadata": dict(trigger.metadata),
        }
    except _NotJSON as exc:
        raise PayloadError("trigger", "WorkflowTrigger", [str(exc)]) from exc


# --- the registry ----------------------------------------------------------------------------------------


@attrs.frozen
class RegisteredNode:
    """A node as the registry accepted it, with what the engine needs to call it.

    `state_type` / `config_type` are the resolved types (``Any`` when the node names none);
    `has_can_start` tells whether the node overrides `Node.can_start` (if not, the engine skips the call).
    """

    node: Node[Any, Any]
    name: str
    state_type: Any
    config_type: Any
    has_can_start: bool
    retry: RetryPolicy
    timeout: float | None
    concurrency: int | None
    converter: cattrs.Converter = attrs.field(eq=False, repr=False)


def resolve_generic_arguments(cls: type, generic_base: type) -> tuple[Any, ...] | None:
    """The type arguments `cls` gives `generic_base`, following subclasses of subclasses (and generic
    intermediates such as ``class Base(Node[S, C])`` / ``class Sub(Base[X])``). None if it gives none; an
    argument nobody bound is left as its TypeVar."""
    return _resolve_arguments(cls, generic_base, {})


def _resolve_arguments(cls: type, generic_base: type, bindings: Mapping[Any, Any]) -> tuple[Any, ...] | None:
    for base in cls.__dict__.get("__orig_bases__", cls.__bases__):
        origin = _origin_class(base)
        if not (isinstance(origin, type) and issubclass(origin, generic_base)):
            continue
        arguments = tuple(_substitute(argument, bindings) for argument in get_args(base))
        if origin is generic_base:
            if arguments:
                return arguments
            continue
        parameters = origin.__dict__.get("__parameters__", ())
        found = _resolve_arguments(origin, generic_base, dict(zip(parameters, arguments, strict=False)))
        if found is not None:
            return found
    return None


def _is_object_type(tp: Any, *, allow_any: bool) -> bool:
    tp = _strip_annotated(tp)
    if tp is Any:
        return allow_any
    if _is_mapping_type(tp):
        arguments = get_args(tp)
        return not arguments or _strip_annotated(arguments[0]) in (str, Any)
    return _is_attrs_or_dataclass(tp) or _is_typeddict(tp)


def _unsupported(tp: Any, converter: cattrs.Converter, where: str, seen: set[Any]) -> list[str]:
    """What cattrs could not structure in `tp`, field by field (empty when all is well)."""
    tp = _strip_annotated(tp)
    if tp is Any or tp is _NoneType:
        return []
    if isinstance(tp, TypeVar):
        return [f"{where}: type variable {tp} is not bound to a type"]
    if isinstance(tp, str | ForwardRef):
        return [f"{where}: unresolved forward reference {tp!r}"]
    if hasattr(tp, "__supertype__"):  # typing.NewType
        return _unsupported(tp.__supertype__, converter, where, seen)
    if get_origin(tp) is Literal:
        return []
    problems: list[str] = []
    if _is_attrs_or_dataclass(tp) or _is_typeddict(tp):
        if tp in seen:
            return []
        seen.add(tp)
        try:
            field_types = _field_types(tp)
        except Exception as exc:
            return [f"{where}: cannot resolve the field types of {type_name(tp)} ({type(exc).__name__}: {exc})"]
        for name, field_type in field_types.items():
            problems += _unsupported(field_type, converter, f"{where}.{name}", seen)
    else:
        for argument in get_args(tp):
            if argument is not Ellipsis:
                problems += _unsupported(argument, converter, where, seen)
    if problems:
        return problems
    try:
        converter.get_structure_hook(tp)
    except Exception as exc:
        return [f"{where}: cattrs cannot structure {type_name(tp)} ({type(exc).__name__}: {exc})"]
    return []


def _check_method(node: Node[Any, Any], method_name: str) -> inspect.Signature:
    label = f"{type(node).__qualname__}.{method_name}"
    shape = f"`async def {method_name}(self, ctx, state, config)`"
    method = getattr(node, method_name, None)
    if not callable(method):
        raise NodeRegistrationError(f"{label} must be {shape}; it is {method!r}")
    if not inspect.iscoroutinefunction(method):
        raise NodeRegistrationError(f"{label} must be {shape}; it is not `async def`")
    signature = inspect.signature(method)
    try:
        signature.bind(None, None, None)
    except TypeError as exc:
        raise NodeRegistrationError(
            f"{label} must be {shape}; its signature {signature} cannot take (ctx, state, config): {exc}"
        ) from None
    return signature


def _annotated_types(node: Node[Any, Any], signature: inspect.Signature) -> tuple[Any, Any]:
    """The annotations of execute's state and config parameters (the 2nd and 3rd positional ones)."""
    label = f"{type(node).__qualname__}.execute"
    positional = [
        parameter.name
        for parameter in signature.parameters.values()
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    method = node.execute
    try:
        hints = typing.get_type_hints(getattr(method, "__func__", method))
    except Exception as exc:
        raise NodeRegistrationError(
            f"cannot resolve the annotations of {label} ({type(exc).__name__}: {exc}); "
            "give the types as type parameters instead: class MyNode(Node[MyState, MyConfig])"
        ) from None
    state_name = positional[1] if len(positional) > 1 else None
    config_name = positional[2] if len(positional) > 2 else None
    return hints.get(state_name, Any) if state_name else Any, hints.get(config_name, Any) if config_name else Any


def _resolved(generic: Any, annotated: Any) -> Any:
    for candidate in (generic, annotated):
        candidate = _strip_annotated(candidate)
        if candidate is not None and not isinstance(candidate, TypeVar):
            return Any if candidate is object else candidate
    return Any


class NodeRegistry:
    """The nodes this member can run, by name, in registration order."""

    def __init__(self, converter: cattrs.Converter | None = None) -> None:
        self.converter = converter or payload_converter
        self._nodes: dict[str, RegisteredNode] = {}

    def register(self, node: Node[Any, Any]) -> RegisteredNode:
        """Check `node` and add it; raises `NodeRegistrationError` saying what is wrong, and adds nothing."""
        if isinstance(node, type):
            if issubclass(node, Node):
                raise NodeRegistrationError(
                    f"register an instance of {node.__qualname__}, not the class: register_node({node.__qualname__}())"
                )
            raise NodeRegistrationError(f"{node.__qualname__} is not a graft_trio.Node subclass")
        if not isinstance(node, Node):
            raise NodeRegistrationError(f"{type(node).__qualname__} is not a graft_trio.Node (subclass graft.Node)")
        label = type(node).__qualname__
        name = getattr(node, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise NodeRegistrationError(
                f'{label} needs a name: set the class attribute `name = "..."` to a non-empty string (got {name!r})'
            )
        if name in self._nodes:
            other = type(self._nodes[name].node).__qualname__
            raise NodeRegistrationError(f"a node named {name!r} is already registered ({other}); names are unique")
        if getattr(type(node), "execute", None) is Node.execute:
            raise NodeRegistrationError(f"{label} does not define `async def execute(self, ctx, state, config)`")
        signature = _check_method(node, "execute")
        has_can_start = getattr(type(node), "can_start", None) is not Node.can_start
        if has_can_start:
            _check_method(node, "can_start")
        retry = getattr(node, "retry", None)
        if not isinstance(retry, RetryPolicy):
            raise NodeRegistrationError(f"{label}.retry must be a RetryPolicy, got {retry!r}")
        timeout = getattr(node, "timeout", None)
        if timeout is not None and (
            not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout < math.inf
        ):
            raise NodeRegistrationError(
                f"{label}.timeout must be None or a positive number of seconds, got {timeout!r}"
            )
        concurrency = getattr(node, "concurrency", None)
        if concurrency is not None and (
            not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
        ):
            raise NodeRegistrationError(f"{label}.concurrency must be None or a positive int, got {concurrency!r}")
        state_type, config_type = self._types(node, signature)
        registered = RegisteredNode(
            node=node,
            name=name,
            state_type=state_type,
            config_type=config_type,
            has_can_start=has_can_start,
            retry=retry,
            timeout=float(timeout) if timeout is not None else None,
            concurrency=concurrency,
            converter=self.converter,
        )
        self._nodes[name] = registered
        return registered

    def _types(self, node: Node[Any, Any], signature: inspect.Signature) -> tuple[Any, Any]:
        label = type(node).__qualname__
        generic = resolve_generic_arguments(type(node), Node) or (None, None)
        annotated_state, annotated_config = _annotated_types(node, signature)
        state_type = _resolved(generic[0], annotated_state)
        config_type = _resolved(generic[1], annotated_config)
        if not _is_object_type(state_type, allow_any=True):
            raise NodeRegistrationError(
                f"{label}: the state type {type_name(state_type)} is not an object type; the workflow state is a "
                "JSON object: use an attrs class, a dataclass, a TypedDict, dict or Any"
            )
        problems = _unsupported(state_type, self.converter, f"state type {type_name(state_type)}", set())
        problems += _unsupported(config_type, self.converter, f"config type {type_name(config_type)}", set())
        if problems:
            raise NodeRegistrationError(
                f"{label}: {'; '.join(problems)} (register a cattrs hook for it on the converter, or use a "
                "supported type: attrs classes, dataclasses, TypedDicts, dicts, lists and JSON scalars)"
            )
        return state_type, config_type

    def get(self, name: str) -> RegisteredNode | None:
        return self._nodes.get(name)

    def __getitem__(self, name: str) -> RegisteredNode:
        return self._nodes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __iter__(self) -> Iterator[RegisteredNode]:
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)


# --- what the engine calls around execute ---------------------------------------------------------------


def _copy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value


def prepare_call(registered: RegisteredNode, state_json: Any, config_json: Any) -> tuple[Any, Any]:
    """The node's typed `(state, config)` from the workflow's state document and the step's config.

    Both are structured from copies, so a node that mutates what it gets cannot touch the replicated
    state. A null state reads as ``{}``; a null config reads as ``{}`` when the config type is object-shaped
    (attrs, dataclass, TypedDict, dict), so a config class whose fields all have defaults needs no config.
    Raises `PayloadError` (what ``"state"`` or ``"config"``) naming the fields that do not fit.
    """
    state_value = {} if state_json is None else _copy_json(state_json)
    config_value = _copy_json(config_json)
    if config_value is None and _is_object_type(registered.config_type, allow_any=False):
        config_value = {}
    state = structure_payload(
        state_value, registered.state_type, "state", converter=registered.converter, node=registered.name
    )
    config = structure_payload(
        config_value, registered.config_type, "config", converter=registered.converter, node=registered.name
    )
    return state, config


def result_patch(registered: RegisteredNode, result: object) -> tuple[JSONObject, list[JSONObject], JSONObject | None]:
    """`(patch, next_nodes, join)` as JSON from what `execute` returned.

    `patch` is the state patch (`unstructure_state` of `result.data`; ``{}`` for None); each next node and the
    join is ``{"name", "config", "priority", "delay", "idempotency_key"}`` with its config unstructured
    exactly; `join` is None when the result names none. Raises `PayloadError` (what ``"result"``, not
    retryable) if `result` is not a `NodeResult` or holds a value that is not JSON, with its path
    (``$.data.when``, ``$.next_nodes[1].config.limit``).
    """
    if not isinstance(result, NodeResult):
        hint = " (did execute forget to return?)" if result is None else ""
        raise PayloadError(
            "result", "NodeResult", [f"expected a NodeResult, got {_describe(result)}{hint} @ $"], node=registered.name
        )
    converter = registered.converter
    try:
        patch = _state_json(result.data, "$.data", converter)
        next_nodes = [
            _next_node_json(next_node, f"$.next_nodes[{index}]", converter)
            for index, next_node in enumerate(result.next_nodes)
        ]
        join = _next_node_json(result.join, "$.join", converter) if result.join is not None else None
    except _NotJSON as exc:
        raise PayloadError("result", "NodeResult", [str(exc)], node=registered.name) from exc
    return patch, next_nodes, join
