"""The workflow types of SPEC §2 and the typing layer: registration, payload structuring, result patches."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
from typing import Any, Generic, Literal, NewType, TypedDict, TypeVar

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from graft_trio.workflow.payloads import (
    NodeRegistry,
    RegisteredNode,
    make_payload_converter,
    prepare_call,
    resolve_generic_arguments,
    result_patch,
    structure_payload,
    trigger_json,
    unstructure_payload,
    unstructure_state,
)
from graft_trio.workflow.types import (
    NextNode,
    Node,
    NodeConfig,
    NodeContext,
    NodeRegistrationError,
    NodeResult,
    NonRetryableError,
    PayloadError,
    RetryPolicy,
    StepInfo,
    StepStatus,
    WorkflowExistsError,
    WorkflowNotFoundError,
    WorkflowState,
    WorkflowStatus,
    WorkflowTrigger,
)

EXAMPLES = settings(max_examples=200, deadline=None)

# --- the SPEC §2 example --------------------------------------------------------------------------------


@attrs.frozen
class GreeterConfig:
    message: str


@attrs.define
class GreeterState:
    name: str
    greeting: str | None = None


class Greeter(Node[GreeterState, GreeterConfig]):
    name = "greeter"
    retry = RetryPolicy(max_attempts=3, initial_interval=1.0, backoff=2.0, max_interval=300.0)
    timeout = 300.0

    async def execute(self, ctx: NodeContext, state: GreeterState, config: GreeterConfig) -> NodeResult:
        return NodeResult(data={"greeting": f"{config.message}, {state.name}!"})


def context(node_name: str = "greeter", attempt: int = 1) -> NodeContext:
    return NodeContext(
        workflow_id="wf-001",
        node_name=node_name,
        member_id="node-1",
        attempt=attempt,
        execution_id="wf-001/1",
        metadata={"team": "a"},
        started_at=0.0,
    )


async def test_greeter_round_trip() -> None:
    registry = NodeRegistry()
    registered = registry.register(Greeter())
    assert registered.state_type is GreeterState
    assert registered.config_type is GreeterConfig
    assert registered.timeout == 300.0
    assert registered.has_can_start is False

    trigger = WorkflowTrigger(
        workflow_id="wf-001",
        initial_state=GreeterState(name="Ada"),
        initial_nodes=[NodeConfig(name="greeter", config=GreeterConfig(message="Hello"))],
    )
    payload = trigger_json(trigger)
    assert payload == {
        "workflow_id": "wf-001",
        "initial_state": {"name": "Ada"},  # greeting is None: absent from a state document
        "initial_nodes": [
            {"name": "greeter", "config": {"message": "Hello"}, "priority": 0, "delay": 0.0, "idempotency_key": None}
        ],
        "metadata": {},
    }
    document = payload["initial_state"]
    step = payload["initial_nodes"][0]
    state, config = prepare_call(registered, document, step["config"])
    assert state == GreeterState(name="Ada")
    assert config == GreeterConfig(message="Hello")

    result = await registered.node.execute(context(), state, config)
    patch, next_nodes, join = result_patch(registered, result)
    assert (patch, next_nodes, join) == ({"greeting": "Hello, Ada!"}, [], None)

    merged = {**document, **patch}
    assert merged == {"name": "Ada", "greeting": "Hello, Ada!"}
    assert prepare_call(registered, merged, step["config"])[0] == GreeterState(name="Ada", greeting="Hello, Ada!")


@EXAMPLES
@given(name=st.text(), greeting=st.none() | st.text())
def test_typed_state_reads_back_what_it_wrote(name: str, greeting: str | None) -> None:
    original = GreeterState(name=name, greeting=greeting)
    document = unstructure_state(original)
    assert ("greeting" in document) == (greeting is not None)
    assert structure_payload(document, GreeterState) == original
    assert structure_payload(unstructure_payload(GreeterConfig(name)), GreeterConfig) == GreeterConfig(name)


# --- registration ---------------------------------------------------------------------------------------


class Unsupported:
    """A plain class: cattrs has no hook for it."""


@attrs.define
class StateWithUnsupportedField:
    thing: Unsupported | None = None


class NoName(Node[dict[str, Any], None]):
    async def execute(self, ctx: NodeContext, state: dict[str, Any], config: None) -> NodeResult:
        return NodeResult()


class EmptyName(NoName):
    name = "  "


class NumberName(NoName):
    name = 5  # type: ignore[assignment]


class SyncExecute(Node[dict[str, Any], None]):
    name = "sync"

    def execute(self, ctx: NodeContext, state: dict[str, Any], config: None) -> NodeResult:  # type: ignore[override]
        return NodeResult()


class TwoParameters(Node[dict[str, Any], None]):
    name = "two"

    async def execute(self, ctx: NodeContext, state: dict[str, Any]) -> NodeResult:  # type: ignore[override]
        return NodeResult()


class ExtraRequired(Node[dict[str, Any], None]):
    name = "extra"

    async def execute(  # type: ignore[override]
        self, ctx: NodeContext, state: dict[str, Any], config: None, *, more: int
    ) -> NodeResult:
        return NodeResult()


class SyncCanStart(NoName):
    name = "sync-can-start"

    def can_start(self, ctx: NodeContext, state: dict[str, Any], config: None) -> bool:  # type: ignore[override]
        return True


class NarrowCanStart(NoName):
    name = "narrow-can-start"

    async def can_start(self, ctx: NodeContext) -> bool:  # type: ignore[override]
        return True


def with_attributes(**attributes: Any) -> Node[Any, Any]:
    cls = type("Configured", (NoName,), {"name": "configured", **attributes})
    node: Node[Any, Any] = cls()
    return node


class IntState(Node[int, None]):
    name = "int-state"

    async def execute(self, ctx: NodeContext, state: int, config: None) -> NodeResult:
        return NodeResult()


class UnsupportedField(Node[StateWithUnsupportedField, None]):
    name = "unsupported-field"

    async def execute(self, ctx: NodeContext, state: StateWithUnsupportedField, config: None) -> NodeResult:
        return NodeResult()


class UnsupportedConfig(Node[dict[str, Any], Unsupported]):
    name = "unsupported-config"

    async def execute(self, ctx: NodeContext, state: dict[str, Any], config: Unsupported) -> NodeResult:
        return NodeResult()


class UnresolvableAnnotation(Node):  # type: ignore[type-arg]
    name = "unresolvable"

    async def execute(self, ctx: NodeContext, state: DoesNotExist, config: None) -> NodeResult:  # type: ignore[name-defined] # noqa: F821
        return NodeResult()


REJECTIONS: list[tuple[str, Any, str]] = [
    ("class instead of instance", Greeter, "register an instance of Greeter, not the class"),
    ("not a node", object(), "object is not a graft_trio.Node"),
    ("no name", NoName(), "NoName needs a name"),
    ("blank name", EmptyName(), "EmptyName needs a name"),
    ("name not a string", NumberName(), "(got 5)"),
    ("sync execute", SyncExecute(), "SyncExecute.execute must be `async def execute(self, ctx, state, config)`"),
    ("execute without config", TwoParameters(), "cannot take (ctx, state, config)"),
    ("execute with a required extra", ExtraRequired(), "cannot take (ctx, state, config)"),
    (
        "sync can_start",
        SyncCanStart(),
        "SyncCanStart.can_start must be `async def can_start(self, ctx, state, config)`",
    ),
    ("narrow can_start", NarrowCanStart(), "NarrowCanStart.can_start must be"),
    ("zero timeout", with_attributes(timeout=0), "timeout must be None or a positive number of seconds, got 0"),
    ("negative timeout", with_attributes(timeout=-1.0), "timeout must be None or a positive number"),
    ("string timeout", with_attributes(timeout="10"), "timeout must be None or a positive number"),
    ("infinite timeout", with_attributes(timeout=math.inf), "timeout must be None or a positive number"),
    ("zero concurrency", with_attributes(concurrency=0), "concurrency must be None or a positive int, got 0"),
    ("float concurrency", with_attributes(concurrency=1.5), "concurrency must be None or a positive int"),
    ("bool concurrency", with_attributes(concurrency=True), "concurrency must be None or a positive int"),
    ("retry not a policy", with_attributes(retry=3), "retry must be a RetryPolicy, got 3"),
    ("state not an object", IntState(), "the state type int is not an object type"),
    ("unsupported field", UnsupportedField(), "StateWithUnsupportedField.thing: cattrs cannot structure Unsupported"),
    ("unsupported config", UnsupportedConfig(), "config type Unsupported: cattrs cannot structure Unsupported"),
    ("unresolvable annotation", UnresolvableAnnotation(), "cannot resolve the annotations of"),
]


@pytest.mark.parametrize(("node", "message"), [case[1:] for case in REJECTIONS], ids=[case[0] for case in REJECTIONS])
def test_registration_rejects(node: Any, message: str) -> None:
    registry = NodeRegistry()
    with pytest.raises(NodeRegistrationError) as caught:
        registry.register(node)
    assert message in str(caught.value)
    assert len(registry) == 0


def test_registration_rejects_a_duplicate_name() -> None:
    registry = NodeRegistry()
    registry.register(Greeter())
    with pytest.raises(NodeRegistrationError, match=r"a node named 'greeter' is already registered \(Greeter\)"):
        registry.register(Greeter())
    assert len(registry) == 1


class Second(NoName):
    name = "second"


class Third(NoName):
    name = "third"


def test_registry_lookup_and_order() -> None:
    registry = NodeRegistry()
    for node in (Third(), Greeter(), Second()):
        registry.register(node)
    assert [registered.name for registered in registry] == ["third", "greeter", "second"]
    greeter = registry.get("greeter")
    assert isinstance(greeter, RegisteredNode) and isinstance(greeter.node, Greeter)
    assert registry["second"].config_type is type(None)
    assert registry.get("missing") is None
    assert "third" in registry and "missing" not in registry
    with pytest.raises(KeyError):
        registry["missing"]


def test_a_hook_on_the_converter_makes_a_type_supported() -> None:
    converter = make_payload_converter()
    converter.register_structure_hook(Unsupported, lambda value, _: Unsupported())
    registered = NodeRegistry(converter).register(UnsupportedConfig())
    assert isinstance(prepare_call(registered, {}, "anything")[1], Unsupported)


# --- can_start ------------------------------------------------------------------------------------------


class Gated(Node[dict[str, Any], None]):
    name = "gated"

    async def execute(self, ctx: NodeContext, state: dict[str, Any], config: None) -> NodeResult:
        return NodeResult()

    async def can_start(self, ctx: NodeContext, state: dict[str, Any], config: None) -> bool:
        return bool(state.get("ready"))


class GatedChild(Gated):
    name = "gated-child"


async def test_can_start_is_detected() -> None:
    registry = NodeRegistry()
    gated = registry.register(Gated())
    assert gated.has_can_start is True
    assert registry.register(GatedChild()).has_can_start is True  # inherited still counts
    assert registry.register(Greeter()).has_can_start is False
    state, config = prepare_call(gated, {"ready": True}, None)
    assert await gated.node.can_start(context("gated"), state, config) is True
    assert await Greeter().can_start(context(), GreeterState("x"), GreeterConfig("y")) is True


# --- where the types come from --------------------------------------------------------------------------


@dataclasses.dataclass
class DataState:
    count: int
    tags: list[str] = dataclasses.field(default_factory=list)


class DictConfig(TypedDict):
    limit: int
    label: str | None


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@attrs.define
class Line:
    sku: str
    quantity: int = 1
    color: Color = Color.RED
    note: str | None = attrs.field(default=None)


@attrs.define
class Address:
    city: str
    zip: str | None = None


@attrs.define
class Order:
    lines: list[Line]
    address: Address | None = None
    owner: str | None = attrs.field(kw_only=True)  # accepts None and has no default


ConfigT = TypeVar("ConfigT")


class OrderBase(Node[Order, ConfigT]):
    """Binds the state, leaves the config to its subclasses."""

    async def execute(self, ctx: NodeContext, state: Order, config: ConfigT) -> NodeResult:
        return NodeResult(data=state)


class OrderNode(OrderBase[DataState]):
    name = "order"


class OrderGrandchild(OrderNode):
    name = "order-grandchild"


class TypedDictNode(Node[DataState, DictConfig]):
    name = "typed-dict"

    async def execute(self, ctx: NodeContext, state: DataState, config: DictConfig) -> NodeResult:
        return NodeResult()


class AnnotatedOnly(Node):  # type: ignore[type-arg]
    """No type parameters: the annotations of execute give the types."""

    name = "annotated"

    async def execute(self, ctx: NodeContext, state: DataState, config: GreeterConfig) -> NodeResult:
        return NodeResult()


class Untyped(Node):  # type: ignore[type-arg]
    name = "untyped"

    async def execute(self, ctx, state, config):  # type: ignore[no-untyped-def]
        return NodeResult()


class AnyState(Node[Any, dict]):  # type: ignore[type-arg]
    name = "any"

    async def execute(self, ctx: NodeContext, state: Any, config: dict) -> NodeResult:  # type: ignore[type-arg]
        return NodeResult()


S = TypeVar("S")


class Wrapper(Generic[S]):
    """A generic mixin that is not a Node: its parameter must not be taken for the node's."""


class Mixed(Wrapper[int], Node[GreeterState, None]):
    name = "mixed"

    async def execute(self, ctx: NodeContext, state: GreeterState, config: None) -> NodeResult:
        return NodeResult()


def test_generic_arguments_through_subclasses() -> None:
    assert resolve_generic_arguments(OrderNode, Node) == (Order, DataState)
    assert resolve_generic_arguments(OrderGrandchild, Node) == (Order, DataState)
    assert resolve_generic_arguments(Mixed, Node) == (GreeterState, type(None))
    assert resolve_generic_arguments(Untyped, Node) is None
    registry = NodeRegistry()
    cases: list[tuple[Node[Any, Any], Any, Any]] = [
        (OrderGrandchild(), Order, DataState),
        (TypedDictNode(), DataState, DictConfig),
        (AnnotatedOnly(), DataState, GreeterConfig),
        (Untyped(), Any, Any),
        (AnyState(), Any, dict),
        (Mixed(), GreeterState, type(None)),
    ]
    for node, state_type, config_type in cases:
        registered = registry.register(node)
        assert (registered.state_type, registered.config_type) == (state_type, config_type), node


def test_dataclass_state_and_typeddict_config() -> None:
    registered = NodeRegistry().register(TypedDictNode())
    state, config = prepare_call(registered, {"count": 2, "other": "kept elsewhere"}, {"limit": 3, "label": None})
    assert state == DataState(count=2)
    assert config == {"limit": 3, "label": None}
    # A TypedDict key that accepts None may be missing: it reads as None.
    assert prepare_call(registered, {"count": 0}, {"limit": 1})[1] == {"limit": 1, "label": None}
    with pytest.raises(PayloadError) as caught:
        prepare_call(registered, {"count": 0, "tags": ["a", 2]}, {"limit": "3"})
    assert caught.value.what == "state"
    assert caught.value.paths == ("$.tags[1]",)


def test_any_and_dict_states_pass_through_as_copies() -> None:
    registered = NodeRegistry().register(AnyState())
    document = {"nested": {"values": [1, 2]}, "flag": True}
    config = {"k": {"v": 1}}
    state, typed_config = prepare_call(registered, document, config)
    assert state == document and typed_config == config
    state["nested"]["values"].append(3)
    typed_config["k"]["v"] = 2
    assert document == {"nested": {"values": [1, 2]}, "flag": True}  # the node cannot touch the replicated state
    assert config == {"k": {"v": 1}}
    assert prepare_call(registered, None, None) == ({}, {})


def test_nested_attrs_state() -> None:
    registered = NodeRegistry().register(OrderNode())
    document = {
        "lines": [{"sku": "a"}, {"sku": "b", "quantity": 2, "color": "blue"}],
        "address": {"city": "Oslo"},
        "written_by_another_node": [1, 2, 3],
    }
    state, config = prepare_call(registered, document, {"count": 1})
    assert state == Order(
        lines=[Line("a"), Line("b", quantity=2, color=Color.BLUE)], address=Address("Oslo"), owner=None
    )
    assert config == DataState(count=1)


UserId = NewType("UserId", str)
T = TypeVar("T")


@attrs.define
class Tree:
    value: int
    children: list[Tree] = attrs.Factory(list)


@attrs.define
class Box(Generic[T]):
    item: T


@attrs.define
class Rich:
    when: datetime.datetime
    kind: Literal["x", "y"] = "x"
    user: UserId = UserId("nobody")
    box: Box[int] | None = None
    tree: Tree | None = None


class RichNode(Node[Rich, Box[str]]):
    name = "rich"

    async def execute(self, ctx: NodeContext, state: Rich, config: Box[str]) -> NodeResult:
        return NodeResult(data=state)


def test_recursive_generic_and_datetime_fields_round_trip() -> None:
    registered = NodeRegistry().register(RichNode())
    assert registered.config_type == Box[str]
    rich = Rich(datetime.datetime(2024, 1, 2, 3, 4), "y", UserId("ada"), Box(1), Tree(1, [Tree(2)]))
    patch, _, _ = result_patch(registered, NodeResult(data=rich))
    assert patch["when"] == "2024-01-02T03:04:00"
    assert prepare_call(registered, patch, {"item": "s"}) == (rich, Box("s"))
    with pytest.raises(PayloadError) as caught:
        prepare_call(registered, {**patch, "tree": {"value": 1, "children": [{"value": "2"}]}}, {"item": 1})
    assert caught.value.paths == ("$.tree.children[0].value",)
    with pytest.raises(PayloadError, match=r"@ \$\.item"):
        prepare_call(registered, patch, {"item": 1})


# --- payloads that do not fit ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "problems"),
    [
        ({"lines": [{"sku": "a"}, {"sku": "b"}, {"quantity": 1}]}, ["required field missing @ $.lines[2].sku"]),
        ({"lines": [{"sku": "a"}, {"sku": 7}]}, ["expected a string, got an integer @ $.lines[1].sku"]),
        ({"lines": [{"sku": "a", "quantity": "2"}]}, ["expected an integer, got a string @ $.lines[0].quantity"]),
        ({"lines": [{"sku": "a", "color": "green"}]}, ["expected Color (ValueError: 'green' is not a valid Color)"]),
        ({"lines": "abc"}, ["expected an array (list[Line]), got a string @ $.lines"]),
        ({"lines": ["abc"]}, ["expected an object (Line), got a string @ $.lines[0]"]),
        ({"lines": [], "address": {"zip": "1"}}, ["required field missing @ $.address.city"]),
        ({}, ["required field missing @ $.lines"]),
        ("not an object", ["expected an object (Order), got a string @ $"]),
    ],
)
def test_a_payload_that_does_not_fit_names_the_field(document: Any, problems: list[str]) -> None:
    registered = NodeRegistry().register(OrderNode())
    with pytest.raises(PayloadError) as caught:
        prepare_call(registered, document, {"count": 1})
    error = caught.value
    assert isinstance(error, NonRetryableError)
    assert (error.what, error.expected, error.node) == ("state", "Order", "order")
    for problem, expected in zip(error.problems, problems, strict=True):
        assert problem.startswith(expected)
    assert str(error).startswith("node 'order': state does not fit Order: ")


def test_a_config_that_does_not_fit_names_the_field() -> None:
    registered = NodeRegistry().register(Greeter())
    with pytest.raises(PayloadError, match=r"config does not fit GreeterConfig: required field missing @ \$\.message"):
        prepare_call(registered, {"name": "Ada"}, {"mesage": "typo"})
    with pytest.raises(PayloadError, match=r"required field missing @ \$\.message"):
        prepare_call(registered, {"name": "Ada"}, None)  # a null config reads as {}


@attrs.define
class Flags:
    enabled: bool = False
    ratio: float = 0.0
    count: int = 0
    names: tuple[str, ...] = ()


def test_scalars_are_strict_and_lossless() -> None:
    assert structure_payload({"enabled": True, "ratio": 1, "count": 2.0, "names": ["a"]}, Flags) == Flags(
        True, 1.0, 2, ("a",)
    )
    for document, path in [
        ({"enabled": "false"}, "$.enabled"),
        ({"enabled": 1}, "$.enabled"),
        ({"ratio": True}, "$.ratio"),
        ({"count": 2.5}, "$.count"),
        ({"count": False}, "$.count"),
        ({"names": "ab"}, "$.names"),
        ({"names": {"a": 1}}, "$.names"),
    ]:
        with pytest.raises(PayloadError) as caught:
            structure_payload(document, Flags)
        assert caught.value.paths == (path,), document


def test_all_problems_are_reported() -> None:
    with pytest.raises(PayloadError) as caught:
        structure_payload({"enabled": "x", "count": "y"}, Flags, what="config")
    assert sorted(caught.value.paths) == ["$.count", "$.enabled"]
    assert caught.value.what == "config"


# --- results --------------------------------------------------------------------------------------------


async def test_result_patch_from_a_mapping_keeps_none_as_delete() -> None:
    registered = NodeRegistry().register(Greeter())
    result = NodeResult(
        data={"greeting": None, "nested": {"a": 1, "gone": None}, "items": (1, 2)},
        next_nodes=[
            NextNode("ship", config=Address("Oslo"), priority=5, delay=2, idempotency_key="ship-1"),
            NextNode("bill"),
        ],
        join=NextNode("done", config={"all": True}),
    )
    patch, next_nodes, join = result_patch(registered, result)
    assert patch == {"greeting": None, "nested": {"a": 1, "gone": None}, "items": [1, 2]}
    assert next_nodes == [
        # a config is stored exactly: its None field stays null
        {
            "name": "ship",
            "config": {"city": "Oslo", "zip": None},
            "priority": 5,
            "delay": 2.0,
            "idempotency_key": "ship-1",
        },
        {"name": "bill", "config": None, "priority": 0, "delay": 0.0, "idempotency_key": None},
    ]
    assert join == {"name": "done", "config": {"all": True}, "priority": 0, "delay": 0.0, "idempotency_key": None}


def test_result_patch_from_an_attrs_instance_never_deletes() -> None:
    registered = NodeRegistry().register(OrderNode())
    order = Order(lines=[Line("a", note=None)], address=Address("Oslo", zip=None), owner=None)
    patch, next_nodes, join = result_patch(registered, NodeResult(data=order))
    assert patch == {"lines": [{"sku": "a", "quantity": 1, "color": "red"}], "address": {"city": "Oslo"}}
    assert (next_nodes, join) == ([], None)
    # ...and it reads back as what was returned: absent fields that accept None read as None.
    assert structure_payload(patch, Order) == order
    assert result_patch(registered, NodeResult(data=DataState(count=1)))[0] == {"count": 1, "tags": []}
    assert result_patch(registered, NodeResult())[0] == {}


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (None, "result does not fit NodeResult: expected a NodeResult, got null (did execute forget to return?) @ $"),
        ({"greeting": "hi"}, "expected a NodeResult, got an object @ $"),
        (NodeResult(data={"when": object()}), "expected a JSON value, got a value of type object @ $.data.when"),
        (NodeResult(data={"ratio": math.nan}), "expected a finite number, got nan @ $.data.ratio"),
        (NodeResult(data={"m": {1: "a"}}), "object keys must be strings, got an integer 1 @ $.data.m"),
        (
            NodeResult(next_nodes=[NextNode("x"), NextNode("y", config={"z": 1j})]),
            "got a value of type complex @ $.next_nodes[1].config.z",
        ),
        (
            NodeResult(join=NextNode("j", config=[Unsupported()])),
            "expected a JSON value, got a value of type Unsupported @ $.join.config[0]",
        ),
    ],
)
def test_a_result_that_is_not_json_fails_without_retry(result: Any, message: str) -> None:
    registered = NodeRegistry().register(Greeter())
    with pytest.raises(PayloadError) as caught:
        result_patch(registered, result)
    assert isinstance(caught.value, NonRetryableError)
    assert caught.value.what == "result" and caught.value.node == "greeter"
    assert message in str(caught.value)


def test_unstructure_payload_is_exact_json() -> None:
    assert unstructure_payload(Order(lines=[Line("a")], owner=None)) == {
        "lines": [{"sku": "a", "quantity": 1, "color": "red", "note": None}],
        "address": None,
        "owner": None,
    }
    assert unstructure_payload({"s": {3, 1, 2}, "t": (1, "x"), "c": Color.BLUE}) == {
        "s": [1, 2, 3],
        "t": [1, "x"],
        "c": "blue",
    }
    with pytest.raises(PayloadError, match=r"@ \$\.a\[0\]"):
        unstructure_payload({"a": [math.inf]})
    with pytest.raises(PayloadError, match=r"expected a mapping or an attrs/dataclass instance, got an array @ \$"):
        unstructure_state([1])


# --- the plain types ------------------------------------------------------------------------------------


def test_node_result_and_next_node_validate() -> None:
    assert NodeResult(next_nodes=[NextNode("a")]).next_nodes == (NextNode("a"),)
    with pytest.raises(TypeError, match="for one node write next_nodes=\\[NextNode"):
        NodeResult(next_nodes=NextNode("a"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="next_nodes\\[1\\] must be a NextNode, got str"):
        NodeResult(next_nodes=[NextNode("a"), "b"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="data must be None, a mapping or an attrs/dataclass instance, got int"):
        NodeResult(data=3)
    with pytest.raises(TypeError):
        NodeResult(join="done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        NextNode("")
    with pytest.raises(ValueError, match="delay must be a finite number of seconds >= 0"):
        NextNode("a", delay=-1)
    with pytest.raises(TypeError, match="priority must be an int"):
        NextNode("a", priority=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idempotency_key"):
        NextNode("a", idempotency_key="")


def test_trigger_validates() -> None:
    trigger = WorkflowTrigger("wf", None, [NodeConfig("greeter")], metadata={"k": "v"})
    assert trigger_json(trigger)["initial_state"] == {}
    with pytest.raises(TypeError, match="initial_state must be None, a mapping or an attrs/dataclass instance"):
        WorkflowTrigger("wf", 3, [NodeConfig("a")])
    with pytest.raises(ValueError, match="initial_nodes must name at least one node"):
        WorkflowTrigger("wf", {}, [])
    with pytest.raises(TypeError, match="for one node write initial_nodes=\\[NodeConfig"):
        WorkflowTrigger("wf", {}, NodeConfig("a"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metadata must map str to str"):
        WorkflowTrigger("wf", {}, [NodeConfig("a")], metadata={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="workflow_id must be a non-empty string"):
        WorkflowTrigger("", {}, [NodeConfig("a")])
    with pytest.raises(PayloadError, match=r"@ \$\.initial_nodes\[0\]\.config"):
        trigger_json(WorkflowTrigger("wf", {}, [NodeConfig("a", config={"x": Unsupported()})]))


def test_status_and_snapshot_types() -> None:
    assert [status for status in WorkflowStatus if status.is_terminal] == [
        WorkflowStatus.COMPLETED,
        WorkflowStatus.FAILED,
        WorkflowStatus.CANCELLED,
    ]
    assert str(WorkflowStatus.COMPLETED) == "WorkflowStatus.COMPLETED"
    step = StepInfo("wf/1", "greeter", StepStatus.COMPLETED, started_at=1.0, finished_at=3.5)
    assert step.duration == 2.5
    assert StepInfo("wf/2", "greeter", StepStatus.QUEUED).duration is None
    snapshot = WorkflowState("wf", WorkflowStatus.RUNNING, {"a": 1}, started_at=0.0, executed_steps=(step,))
    assert snapshot.id == "wf" and snapshot.metadata == {}
    assert "'wf' already exists" in str(WorkflowExistsError("wf"))
    assert isinstance(WorkflowNotFoundError("wf"), LookupError)


# --- retry policy ---------------------------------------------------------------------------------------

intervals = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    initial = draw(intervals)
    return RetryPolicy(
        max_attempts=draw(st.integers(1, 20)),
        initial_interval=initial,
        backoff=draw(st.floats(min_value=1.0, max_value=10.0)),
        max_interval=draw(st.floats(min_value=initial, max_value=1e5)),
        jitter=draw(st.floats(min_value=0.0, max_value=1.0)),
    )


@EXAMPLES
@given(policy=policies(), attempt=st.integers(1, 10_000), draw=draws)
def test_delay_is_bounded_and_within_the_jitter_range(policy: RetryPolicy, attempt: int, draw: float) -> None:
    delay = policy.delay_for(attempt, draw)
    assert 0.0 <= delay <= policy.max_interval
    try:
        base = min(policy.max_interval, policy.initial_interval * policy.backoff ** (attempt - 1))
    except OverflowError:
        base = policy.max_interval
    assert delay >= base * (1 - policy.jitter) - 1e-9 * base
    assert delay <= base * (1 + policy.jitter) + 1e-9 * base


@EXAMPLES
@given(policy=policies(), attempt=st.integers(1, 50), low=draws, high=draws)
def test_delay_grows_with_the_draw_and_the_attempt(policy: RetryPolicy, attempt: int, low: float, high: float) -> None:
    low, high = sorted((low, high))
    assert policy.delay_for(attempt, low) <= policy.delay_for(attempt, high)
    steady = attrs.evolve(policy, jitter=0.0)
    assert steady.delay_for(attempt, low) <= steady.delay_for(attempt + 1, low)


def test_delay_for_attempts_one_two_and_n() -> None:
    policy = RetryPolicy(initial_interval=1.0, backoff=2.0, max_interval=300.0, jitter=0.0)
    assert [policy.delay_for(attempt, 0.5) for attempt in (1, 2, 3, 9, 10, 10**6)] == [1, 2, 4, 256, 300, 300]
    jittered = RetryPolicy(initial_interval=10.0, backoff=3.0, max_interval=1000.0, jitter=0.5)
    assert jittered.delay_for(1, 0.0) == 5.0
    assert jittered.delay_for(1, 0.5) == 10.0
    assert jittered.delay_for(2, 0.0) == 15.0
    assert jittered.delay_for(2, 0.75) == 37.5
    assert jittered.delay_for(10, 0.99) == 1000.0  # capped even at the top of the jitter range
    assert [policy.should_retry(attempt) for attempt in (1, 2, 3)] == [True, True, False]


@pytest.mark.parametrize(
    "arguments",
    [
        {"max_attempts": 0},
        {"max_attempts": 1.5},
        {"initial_interval": -1.0},
        {"backoff": 0.5},
        {"max_interval": 0.5},
        {"max_interval": math.inf},
        {"jitter": 1.5},
        {"jitter": -0.1},
    ],
)
def test_retry_policy_rejects(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(arguments))):
        RetryPolicy(**arguments)


def test_delay_for_rejects_bad_arguments() -> None:
    policy = RetryPolicy()
    for attempt, draw in [(0, 0.5), (1, 1.0), (1, -0.1), (1, math.nan)]:
        with pytest.raises(ValueError):
            policy.delay_for(attempt, draw)


async def test_greeter_runs_under_trio() -> None:
    """The example node is a plain trio coroutine: it runs inside a nursery like any other."""
    registered = NodeRegistry().register(Greeter())
    results: list[NodeResult] = []

    async def run() -> None:
        results.append(await registered.node.execute(context(), GreeterState("Bo"), GreeterConfig("Hi")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
    assert results == [NodeResult(data={"greeting": "Hi, Bo!"})]
