"""What every transport promises (SPEC §4), tested the same way on each.

Tests over `ALL_TRANSPORTS` hold for every transport, memory included; tests over `NETWORK_TRANSPORTS`
are about what only a network transport has: frames and their limit, the handshake and its
authentication, TLS, connections, queues. A new transport joins by adding its factory to
`tests/transport_helpers.FACTORIES`. The sans-I/O pieces of the shared layer (framing, hello, backoff)
are tested first. Real-network tests run on loopback under `trio.fail_after` guards.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
import trio_websocket
import trustme
from hypothesis import given
from wsproto.events import BytesMessage, TextMessage

from graft_trio.raft import RaftConfig, RaftNode
from graft_trio.raft.codec import decode_message, encode_message
from graft_trio.raft.messages import (
    AppendEntries,
    Entry,
    InstallSnapshot,
    Member,
    Membership,
    Message,
    SnapshotMeta,
)
from graft_trio.transport import Endpoint, TlsConfig, available_transports, load_transport
from tests.kv import KeyValue, put
from tests.transport_helpers import (
    ALL_TRANSPORTS,
    FACTORIES,
    NETWORK_TRANSPORTS,
    Inbox,
    NetworkFactory,
    TransportFactory,
    TrioWebsocketPeer,
    all_tasks,
    beat,
    free_tcp_addresses,
    open_raw_websocket,
    tls_config,
    trio_websocket_peer,
)
from transports._framing import (
    FRAME_HEADER,
    ConnectionLostError,
    FramedConnection,
    FrameDecoder,
    FrameError,
    StreamConnection,
    encode_frames,
)
from transports._handshake import (
    HandshakeError,
    Hello,
    Role,
    accept_handshake,
    dial_handshake,
    new_hello,
    proof,
)
from transports._links import LinkEndpoint, LinkOptions, LinkTransport, backoff_delay
from transports.tcp import TcpTransport, parse_address
from transports.websocket import WEBSOCKET_PATH, WebsocketTransport

GUARD = 10.0  # seconds: no real-network test step should come near this

LOGGER = "graft_trio.transport"


@pytest.fixture(params=ALL_TRANSPORTS)
def factory(request: pytest.FixtureRequest) -> TransportFactory:
    return FACTORIES[request.param]()


@pytest.fixture(params=NETWORK_TRANSPORTS)
def network(request: pytest.FixtureRequest) -> NetworkFactory:
    made = FACTORIES[request.param]()
    assert isinstance(made, NetworkFactory)
    return made


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(key_type=trustme.KeyType.ECDSA)


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA(key_type=trustme.KeyType.ECDSA)


def as_link(endpoint: Endpoint) -> LinkEndpoint:
    assert isinstance(endpoint, LinkEndpoint)
    return endpoint


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@contextlib.asynccontextmanager
async def raw_listener(
    network: NetworkFactory, node_id: str, *, handshake: bool, secret: bytes | None = None
) -> AsyncIterator[str]:
    """A fake member at a fresh address that accepts connections and never reads a frame: after the
    handshake as `node_id` when `handshake`, else not even that. Yields its address."""

    async def hold(connection: FramedConnection) -> None:
        if handshake:
            await accept_handshake(connection, node_id, "fake", secret)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(network.make().serve, network.address(), hold)
        yield address
        nursery.cancel_scope.cancel()


# --- the sans-I/O pieces ------------------------------------------------------------------------------


@given(
    frames=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=7000), max_size=30),
)
def test_frames_are_recovered_however_the_stream_is_cut(frames: list[bytes], cuts: list[int]) -> None:
    stream = encode_frames(frames)
    decoder = FrameDecoder()
    received: list[bytes] = []
    positions = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    for begin, end in itertools.pairwise(positions):
        decoder.feed(stream[begin:end])
        while (frame := decoder.next_frame(300)) is not None:
            received.append(frame)
    assert received == frames
    assert decoder.buffered == 0


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    decoder = FrameDecoder()
    decoder.feed(FRAME_HEADER.pack(1001) + b"x" * 10)
    with pytest.raises(FrameError, match="1001 bytes is over the limit of 1000"):
        decoder.next_frame(1000)
    exact = FrameDecoder()
    exact.feed(encode_frames([b"y" * 1000]))
    assert exact.next_frame(1000) == b"y" * 1000


def test_a_hello_round_trips() -> None:
    hello = new_hello(Role.LISTENER, "node-1", "[::1]:7000", b"secret")
    assert Hello.decode(hello.encode()) == hello


@given(st.binary(max_size=120), st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_bytes_that_are_not_a_hello_raise_handshake_error_only(data: bytes, position: int, value: int) -> None:
    valid = new_hello(Role.DIALER, "n", "a:1", None).encode()
    for candidate in (valid[: position % len(valid)], valid + data[:1] if data else valid + b"x"):
        with pytest.raises(HandshakeError):
            Hello.decode(candidate)
    corrupted = bytearray(valid)
    corrupted[position % len(valid)] = value
    for candidate in (data, b"GRFT" + data, bytes(corrupted)):
        with contextlib.suppress(HandshakeError):
            Hello.decode(candidate)  # a hello, or HandshakeError; nothing else


def test_proofs_bind_both_nonces_and_the_role() -> None:
    dialer = new_hello(Role.DIALER, "a", "a:1", b"k").encode()
    listener = new_hello(Role.LISTENER, "b", "b:1", b"k").encode()
    other_listener = new_hello(Role.LISTENER, "b", "b:1", b"k").encode()  # same fields, a fresh nonce
    base = proof(b"k", Role.DIALER, dialer, listener)
    assert base == proof(b"k", Role.DIALER, dialer, listener)
    assert base != proof(b"k", Role.LISTENER, dialer, listener)
    assert base != proof(b"k", Role.DIALER, dialer, other_listener)
    assert base != proof(b"other", Role.DIALER, dialer, listener)


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    rng = random.Random(7)
    for failures in range(1, 12):
        cap = min(2.0, 0.05 * 2 ** (failures - 1))
        delays = [backoff_delay(failures, 0.05, 2.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # the jitter spans the whole range
    assert backoff_delay(0, 0.05, 2.0, rng) == 0.0
    assert backoff_delay(10_000, 0.05, 2.0, rng) <= 2.0
    same = [backoff_delay(3, 0.05, 2.0, random.Random(1)) for _ in range(2)]
    assert same[0] == same[1]  # the injected RNG decides


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="queue_bytes"):
        LinkOptions(max_frame_bytes=8 * 1024 * 1024, queue_bytes=1024 * 1024)
    with pytest.raises(ValueError, match="cluster_secret"):
        LinkOptions(cluster_secret="")
    with pytest.raises(ValueError, match="connect_timeout"):
        LinkOptions(connect_timeout=0)
    assert LinkOptions(cluster_secret="sésame").cluster_secret == "sésame".encode()


def test_addresses_parse() -> None:
    assert parse_address("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_address("[::1]:7000") == ("::1", 7000)
    assert parse_address("node-2.example:80") == ("node-2.example", 80)
    for bad in ("7000", ":7000", "host:", "host:port", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


# --- every transport ----------------------------------------------------------------------------------


async def test_each_link_delivers_thousands_of_messages_in_order(factory: TransportFactory) -> None:
    transport = factory.make()
    inboxes = {name: Inbox() for name in "abc"}
    async with contextlib.AsyncExitStack() as stack:
        endpoints = {
            name: await stack.enter_async_context(transport.open_endpoint(name, factory.address(), inbox))
            for name, inbox in inboxes.items()
        }
        links = [("a", "b"), ("a", "c"), ("b", "a"), ("c", "a"), ("c", "b")]
        per_link, burst = 5000, 1000  # a burst stays within the default queue bound
        with trio.fail_after(GUARD):
            for start in range(0, per_link, burst):
                for sequence in range(start, start + burst):
                    for source, target in links:
                        endpoints[source].send(target, endpoints[target].address, beat(source, target, sequence))
                for name, inbox in inboxes.items():
                    senders = sum(1 for _, target in links if target == name)
                    await inbox.wait_for_count(senders * (start + burst))
        for source, target in links:
            assert inboxes[target].sequence_from(source) == list(range(per_link))


async def test_raft_sized_messages_are_delivered_whole(factory: TransportFactory) -> None:
    """The largest messages Raft sends with the default RaftConfig fit the default frame limit."""
    config = RaftConfig()
    entries = tuple(
        Entry(term=3, index=i, data=bytes([i % 256]) * (64 * 1024), request_id=f"r/{i}")
        for i in range(1, config.max_message_bytes // (64 * 1024) + 1)
    )
    append = AppendEntries("a", "b", term=3, prev_log_index=0, prev_log_term=0, entries=entries, leader_commit=2)
    membership = Membership.of([Member("a", "a:1"), Member("b", "b:1", voter=False)])
    chunk = InstallSnapshot(
        "a", "b", term=3, meta=SnapshotMeta(9, 3, membership), offset=0,
        data=b"s" * config.snapshot_chunk_bytes, done=False,
    )
    transport = factory.make()
    inbox = Inbox()
    async with transport.open_endpoint("a", factory.address(), Inbox()) as a, transport.open_endpoint(
        "b", factory.address(), inbox
    ) as b:
        a.send("b", b.address, append)
        a.send("b", b.address, chunk)
        with trio.fail_after(GUARD):
            await inbox.wait_for_count(2)
    assert inbox.messages == [append, chunk]


async def test_peer_addresses_are_learned_and_replies_reach_the_sender(factory: TransportFactory) -> None:
    """A member that knows no one (a joining member) answers through the address its transport learned."""
    transport = factory.make()
    a_inbox, b_inbox = Inbox(), Inbox()
    async with transport.open_endpoint("a", factory.address(), a_inbox) as a, transport.open_endpoint(
        "b", factory.address(), b_inbox
    ) as b:
        if factory.network:
            assert b.peer_address("a") is None
        a.send("b", b.address, beat("a", "b", 1))
        with trio.fail_after(GUARD):
            await b_inbox.wait_for_count(1)
            learned = b.peer_address("a")
            assert learned == a.address
            b.send("a", learned, beat("b", "a", 2))
            await a_inbox.wait_for_count(1)
    assert a_inbox.sequence_from("b") == [2]


async def test_leaving_the_endpoint_leaves_no_task_behind_and_closes_its_address(
    factory: TransportFactory,
) -> None:
    transport = factory.make()
    before = all_tasks()
    c_inbox = Inbox()
    async with transport.open_endpoint("c", factory.address(), c_inbox) as c:
        async with transport.open_endpoint("a", factory.address(), Inbox()) as a, transport.open_endpoint(
            "b", factory.address(), Inbox()
        ) as b:
            a_address = a.address
            for source, target in (("a", b), ("b", a), ("a", c)):
                (a if source == "a" else b).send(target.node_id, target.address, beat(source, target.node_id, 0))
            with trio.fail_after(GUARD):
                await c_inbox.wait_for_count(1)
            assert len(all_tasks()) >= len(before)
        assert not await factory.accepts_connections(a_address)
        if factory.network:
            # c's side of a's connection was closed too: c notices, and still serves.
            with trio.fail_after(GUARD):
                await as_link(c).wait_until(lambda: not as_link(c).inbound_peers())
    assert all_tasks() == before


# --- network transports: frames -----------------------------------------------------------------------


async def test_a_frame_at_the_limit_is_delivered_and_one_byte_more_is_dropped_by_the_sender(
    network: NetworkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 64 * 1024
    empty = InstallSnapshot("a", "b", 1, SnapshotMeta(), offset=0, data=b"", done=True)
    overhead = len(encode_message(empty))
    at_limit = InstallSnapshot("a", "b", 1, SnapshotMeta(), offset=0, data=b"x" * (limit - overhead), done=True)
    over_limit = InstallSnapshot("a", "b", 1, SnapshotMeta(), offset=1, data=b"x" * (limit - overhead + 1), done=True)
    assert len(encode_message(at_limit)) == limit
    transport = network.make(max_frame_bytes=limit, queue_bytes=4 * limit)
    inbox = Inbox()
    async with transport.open_endpoint("a", network.address(), Inbox()) as a, transport.open_endpoint(
        "b", network.address(), inbox
    ) as b:
        a.send("b", b.address, at_limit)
        a.send("b", b.address, over_limit)
        a.send("b", b.address, beat("a", "b", 1))
        with trio.fail_after(GUARD):
            await inbox.wait_for_count(2)
        assert inbox.messages == [at_limit, beat("a", "b", 1)]
        assert as_link(a).stats.dropped_oversized == 1
    assert any("over max_frame_bytes" in line and f"{limit + 1} bytes" in line for line in warnings_from(caplog))


async def open_raw_peer(
    network: NetworkFactory, target: LinkEndpoint, node_id: str, secret: bytes | None = None
) -> FramedConnection:
    """A connection to `target` from a fake member `node_id`, past a valid handshake."""
    connection = await network.make().connect(target.address)
    await dial_handshake(connection, node_id, f"{node_id}.fake:1", secret)
    return connection


async def assert_closed_by_peer(connection: FramedConnection) -> None:
    with pytest.raises(ConnectionLostError):
        await connection.receive_frame(1024)
    await connection.aclose()


async def assert_refused_before_any_frame(network: NetworkFactory, address: str) -> None:
    """A new connection to `address` is closed without a frame: on TCP once connected, on websocket while
    it is opened (the listener closes it before answering the upgrade)."""
    try:
        connection = await network.make().connect(address)
    except ConnectionLostError:
        return
    await assert_closed_by_peer(connection)


async def test_an_oversized_frame_closes_only_that_connection(
    network: NetworkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 64 * 1024
    transport = network.make(max_frame_bytes=limit, queue_bytes=4 * limit)
    b_inbox = Inbox()
    async with transport.open_endpoint("a", network.address(), Inbox()) as a, transport.open_endpoint(
        "b", network.address(), b_inbox
    ) as b:
        with trio.fail_after(GUARD):
            a.send("b", b.address, beat("a", "b", 0))
            await b_inbox.wait_for_count(1)
            raw = await open_raw_peer(network, as_link(b), "x")
            await raw.send_frames([encode_message(beat("x", "b", 0))])  # a valid message first
            await b_inbox.wait_for_count(2)
            await raw.send_frames([b"\0" * (limit + 1)])
            await assert_closed_by_peer(raw)
            assert as_link(b).stats.inbound_bad_frames == 1
            # b still serves a, over the connection a already had.
            a.send("b", b.address, beat("a", "b", 1))
            await b_inbox.wait_for(lambda: b_inbox.sequence_from("a") == [0, 1])
        assert as_link(a).stats.connections_opened == 1
        assert as_link(a).stats.connections_lost == 0
    lines = warnings_from(caplog)
    assert any(f"over the limit of {limit}" in line and "member x at x.fake:1" in line for line in lines)


async def test_a_length_header_over_the_limit_closes_the_connection_before_any_body() -> None:
    """On TCP: a peer announcing a 4 GiB frame is cut off at once, without waiting for (or buffering) it."""
    transport = TcpTransport(max_frame_bytes=64 * 1024)
    async with transport.open_endpoint("b", "127.0.0.1:0", Inbox()) as b:
        with trio.fail_after(GUARD):
            host, port = parse_address(b.address)
            stream = await trio.open_tcp_stream(host, port)
            raw = StreamConnection(stream, "test")
            await dial_handshake(raw, "x", "x:1", None)
            await stream.send_all(FRAME_HEADER.pack(2**32 - 1))
            await assert_closed_by_peer(raw)
        assert as_link(b).stats.inbound_bad_frames == 1


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"\x00 not a message", id="garbage"),
        pytest.param(encode_message(beat("x", "b", 0))[:-1], id="truncated"),
        pytest.param(encode_message(beat("x", "b", 0)) + b"\0", id="trailing-bytes"),
        pytest.param(encode_message(beat("a", "b", 0)), id="spoofed-source"),
        pytest.param(encode_message(beat("x", "c", 0)), id="wrong-target"),
        pytest.param(b"", id="empty"),
    ],
)
async def test_a_malformed_frame_closes_only_that_connection(
    network: NetworkFactory, frame: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    transport = network.make()
    inbox = Inbox()
    async with transport.open_endpoint("a", network.address(), Inbox()) as a, transport.open_endpoint(
        "b", network.address(), inbox
    ) as b:
        with trio.fail_after(GUARD):
            raw = await open_raw_peer(network, as_link(b), "x")
            await raw.send_frames([frame, encode_message(beat("x", "b", 1))])
            await assert_closed_by_peer(raw)
            a.send("b", b.address, beat("a", "b", 0))
            await inbox.wait_for_count(1)
        assert inbox.messages == [beat("a", "b", 0)]  # nothing from x, not even its valid message after
        assert as_link(b).stats.inbound_bad_frames == 1
    assert any("closed the connection from" in line and "member x" in line for line in warnings_from(caplog))


async def test_garbage_or_silence_instead_of_a_handshake_is_refused_in_time(
    network: NetworkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    transport = network.make(handshake_timeout=0.3)
    inbox = Inbox()
    async with transport.open_endpoint("b", network.address(), inbox) as b:
        with trio.fail_after(GUARD):
            garbage = await network.make().connect(b.address)
            await garbage.send_frames([b"GET / HTTP/1.1\r\n\r\n"])
            await assert_closed_by_peer(garbage)
            impostor = await network.make().connect(b.address)  # a hello in the listener's role
            await impostor.send_frames([new_hello(Role.LISTENER, "x", "x:1", None).encode()])
            await assert_closed_by_peer(impostor)
            silent = await network.make().connect(b.address)
            await assert_closed_by_peer(silent)  # after handshake_timeout
            await as_link(b).wait_until(lambda: as_link(b).stats.inbound_refused == 3)
    assert not inbox.messages
    lines = warnings_from(caplog)
    assert any("not a graft-trio hello" in line for line in lines)
    assert any("expected the dialer" in line for line in lines)
    assert any("handshake timed out" in line for line in lines)


# --- network transports: reconnection and slow peers -----------------------------------------------------


async def test_a_restarted_peer_is_reconnected_and_messages_flow_again(network: NetworkFactory) -> None:
    transport = network.make()
    async with transport.open_endpoint("a", network.address(), Inbox()) as endpoint:
        a = as_link(endpoint)
        first = Inbox()
        with trio.fail_after(GUARD):
            async with transport.open_endpoint("b", network.address(), first) as b:
                b_address = b.address
                a.send("b", b_address, beat("a", "b", 0))
                await first.wait_for_count(1)
            await a.wait_until(lambda: a.stats.connections_lost == 1)  # noticed at once, not on the next write
            a.send("b", b_address, beat("a", "b", 1))  # b is down: dropped after a failed attempt
            await a.wait_until(lambda: a.stats.connections_failed >= 1 and a.stats.dropped_unsent >= 1)
            second = Inbox()
            async with transport.open_endpoint("b", b_address, second):
                a.send("b", b_address, beat("a", "b", 2))
                await second.wait_for_count(1)
        assert second.sequence_from("a") == [2]
        assert a.stats.connections_opened == 2


@pytest.mark.parametrize("handshake", [True, False], ids=["never-reads", "never-answers-the-handshake"])
async def test_a_peer_that_never_reads_does_not_hold_up_the_others(network: NetworkFactory, handshake: bool) -> None:
    transport = network.make(
        max_frame_bytes=1024 * 1024,
        queue_bytes=2 * 1024 * 1024,
        write_timeout=None,
        handshake_timeout=GUARD,
        connect_timeout=GUARD,  # a websocket dial waits in connect for the upgrade the peer never answers
    )
    inbox = Inbox()
    big = InstallSnapshot("a", "slow", 1, SnapshotMeta(), offset=0, data=b"z" * (512 * 1024), done=False)
    async with raw_listener(network, "slow", handshake=handshake) as slow_address, transport.open_endpoint(
        "a", network.address(), Inbox()
    ) as endpoint, transport.open_endpoint("c", network.address(), inbox) as c:
        a = as_link(endpoint)
        with trio.fail_after(GUARD):
            # Fill the slow peer's socket buffers and then its queue, until its writer makes no headway:
            # a writer that finished a write would take the whole queue on its next turn.
            consecutive_drops = 0
            while consecutive_drops < 50:
                dropped = a.stats.dropped_queue_full
                a.send("slow", slow_address, big)
                await trio.lowlevel.checkpoint()
                consecutive_drops = consecutive_drops + 1 if a.stats.dropped_queue_full > dropped else 0
            for sequence in range(2000):
                a.send("c", c.address, beat("a", "c", sequence))
            await inbox.wait_for_count(2000)
        dropped = a.stats.dropped_queue_full
        a.send("slow", slow_address, big)
        assert a.stats.dropped_queue_full == dropped + 1  # still stuck while c got everything
        assert inbox.sequence_from("a") == list(range(2000))
        # The slow peer's writer is stuck in a write (or in the handshake, or the websocket upgrade), not failed.
        assert a.stats.connections_failed == 0
        assert ("slow" in a.connected_peers()) == handshake


async def test_a_write_that_never_finishes_closes_the_connection_after_write_timeout(
    network: NetworkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    transport = network.make(write_timeout=0.2, queue_bytes=4 * 1024 * 1024)
    big = InstallSnapshot("a", "slow", 1, SnapshotMeta(), offset=0, data=b"z" * (512 * 1024), done=False)
    async with raw_listener(network, "slow", handshake=True) as slow_address, transport.open_endpoint(
        "a", network.address(), Inbox()
    ) as endpoint:
        a = as_link(endpoint)
        with trio.fail_after(GUARD):
            for _ in range(8):
                a.send("slow", slow_address, big)
            await a.wait_until(lambda: a.stats.connections_lost >= 1)
        assert a.stats.dropped_unsent >= 1
    assert any("a write did not finish in 0.2 s" in r.getMessage() for r in caplog.records)


async def test_a_new_connection_from_a_member_replaces_its_old_one(network: NetworkFactory) -> None:
    inbox = Inbox()
    async with network.make().open_endpoint("b", network.address(), inbox) as endpoint:
        b = as_link(endpoint)
        with trio.fail_after(GUARD):
            old = await open_raw_peer(network, b, "x")
            await b.wait_until(lambda: b.stats.inbound_accepted == 1)
            new = await open_raw_peer(network, b, "x")
            await assert_closed_by_peer(old)
            await new.send_frames([encode_message(beat("x", "b", 1))])
            await inbox.wait_for_count(1)
            await new.aclose()
        assert b.inbound_peers() <= {"x"}


async def test_connections_beyond_max_pending_handshakes_are_closed_at_once(network: NetworkFactory) -> None:
    async with network.make(max_pending_handshakes=2, handshake_timeout=GUARD * 2).open_endpoint(
        "b", network.address(), Inbox()
    ) as endpoint:
        b = as_link(endpoint)
        with trio.fail_after(GUARD):
            idle = [await network.make().connect(b.address) for _ in range(2)]
            await b.wait_until(lambda: b.pending_handshakes == 2)
            await assert_refused_before_any_frame(network, b.address)  # long before the handshake timeout
            assert b.stats.inbound_refused == 1
            for connection in idle:
                await connection.aclose()


# --- network transports: authentication -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_secret", "b_secret"),
    [("one", "two"), ("one", None), (None, "two")],
    ids=["different-secrets", "only-a-has-one", "only-b-has-one"],
)
async def test_a_member_with_the_wrong_secret_is_refused(
    network: NetworkFactory, a_secret: str | None, b_secret: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    a_inbox, b_inbox = Inbox(), Inbox()
    async with network.make(cluster_secret=a_secret).open_endpoint(
        "a", network.address(), a_inbox
    ) as a_endpoint, network.make(cluster_secret=b_secret).open_endpoint("b", network.address(), b_inbox) as b_endpoint:
        a, b = as_link(a_endpoint), as_link(b_endpoint)
        a.send("b", b.address, beat("a", "b", 0))
        b.send("a", a.address, beat("b", "a", 0))
        with trio.fail_after(GUARD):
            await a.wait_until(lambda: a.stats.connections_failed >= 1 and a.stats.inbound_refused >= 1)
            await b.wait_until(lambda: b.stats.connections_failed >= 1 and b.stats.inbound_refused >= 1)
    assert not a_inbox.messages and not b_inbox.messages
    assert a.stats.connections_opened == b.stats.connections_opened == 0
    assert a.peer_address("b") is None and b.peer_address("a") is None
    lines = warnings_from(caplog)
    assert any(line.startswith("a: refused a connection from 127.0.0.1:") for line in lines)
    assert any(line.startswith("b: refused a connection from 127.0.0.1:") for line in lines)


async def test_a_reflected_or_replayed_proof_is_refused(network: NetworkFactory) -> None:
    """An attacker without the secret sends back the listener's own proof, or replays a dialer's proof
    from an earlier connection: both are refused before any frame after them is read."""
    secret = b"cluster secret"
    inbox = Inbox()
    async with network.make(cluster_secret=secret).open_endpoint("b", network.address(), inbox) as endpoint:
        b = as_link(endpoint)
        with trio.fail_after(GUARD):
            # Reflection: the listener's proof, echoed as the dialer's.
            attacker = await network.make().connect(b.address)
            hello = new_hello(Role.DIALER, "x", "x:1", secret).encode()
            await attacker.send_frames([hello])
            await attacker.receive_frame(4096)  # the listener's hello
            listener_proof = await attacker.receive_frame(4096)
            await attacker.send_frames([listener_proof, encode_message(beat("x", "b", 0))])
            await assert_closed_by_peer(attacker)

            # Replay: a genuine dialer's hello and proof from one connection, sent again on another.
            recorded = await network.make().connect(b.address)
            await recorded.send_frames([hello])
            listener_hello = await recorded.receive_frame(4096)
            await recorded.receive_frame(4096)
            genuine_proof = proof(secret, Role.DIALER, hello, listener_hello)
            await recorded.send_frames([genuine_proof, encode_message(beat("x", "b", 1))])
            await inbox.wait_for_count(1)  # the genuine connection works...
            replay = await network.make().connect(b.address)
            await replay.send_frames([hello])
            await replay.receive_frame(4096)
            await replay.receive_frame(4096)
            await replay.send_frames([genuine_proof, encode_message(beat("x", "b", 2))])
            await assert_closed_by_peer(replay)  # ...and its proof does not open another
            await recorded.aclose()
        assert inbox.sequence_from("x") == [1]
        assert b.stats.inbound_refused == 2


async def test_an_unauthenticated_transport_warns_once_when_opened(
    network: NetworkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with network.make().open_endpoint("a", network.address(), Inbox()):
        pass
    async with network.make(cluster_secret="s").open_endpoint("b", network.address(), Inbox()):
        pass
    unauthenticated = [line for line in warnings_from(caplog) if "unauthenticated" in line]
    assert len(unauthenticated) == 1 and unauthenticated[0].startswith("a: ")


# --- network transports: TLS --------------------------------------------------------------------------------


async def test_members_with_certificates_from_the_cluster_ca_talk_over_mutual_tls(
    network: NetworkFactory, ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "member.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    tls = TlsConfig.from_files(ca=ca_file, cert=cert_file)
    transport = network.make(tls=tls, cluster_secret="and a secret too")
    a_inbox, b_inbox = Inbox(), Inbox()
    async with transport.open_endpoint("a", network.address(), a_inbox) as a, transport.open_endpoint(
        "b", network.address(), b_inbox
    ) as b:
        with trio.fail_after(GUARD):
            for sequence in range(100):
                a.send("b", b.address, beat("a", "b", sequence))
                b.send("a", a.address, beat("b", "a", sequence))
            await a_inbox.wait_for_count(100)
            await b_inbox.wait_for_count(100)
    assert b_inbox.sequence_from("a") == a_inbox.sequence_from("b") == list(range(100))
    assert not warnings_from(caplog)


async def test_a_member_whose_certificate_is_not_trusted_is_refused(
    network: NetworkFactory, ca: trustme.CA, other_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """`intruder` has a certificate from another CA (it trusts the cluster's CA, so it would accept a):
    a refuses it as a server and as a client."""
    a_inbox, intruder_inbox = Inbox(), Inbox()
    async with network.make(tls=tls_config(ca)).open_endpoint(
        "a", network.address(), a_inbox
    ) as a_endpoint, network.make(tls=tls_config(other_ca, trust=ca)).open_endpoint(
        "intruder", network.address(), intruder_inbox
    ) as intruder:
        a = as_link(a_endpoint)
        a.send("intruder", intruder.address, beat("a", "intruder", 0))
        intruder.send("a", a.address, beat("intruder", "a", 0))
        with trio.fail_after(GUARD):
            await a.wait_until(lambda: a.stats.connections_failed >= 1 and a.stats.inbound_refused >= 1)
    assert not a_inbox.messages and not intruder_inbox.messages
    lines = warnings_from(caplog)
    assert any(line.startswith("a: cannot connect to intruder") and "certificate" in line for line in lines)
    assert any(line.startswith("a: refused a connection from 127.0.0.1:") for line in lines)


async def test_a_client_without_a_certificate_is_refused(
    network: NetworkFactory, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    a_inbox = Inbox()
    async with network.make(tls=tls_config(ca)).open_endpoint(
        "a", network.address(), a_inbox
    ) as a_endpoint, network.make(tls=tls_config(ca, client_cert=False)).open_endpoint(
        "anonymous", network.address(), Inbox()
    ) as anonymous:
        a = as_link(a_endpoint)
        anonymous.send("a", a.address, beat("anonymous", "a", 0))
        with trio.fail_after(GUARD):
            await a.wait_until(lambda: a.stats.inbound_refused >= 1)
    assert not a_inbox.messages
    assert any(line.startswith("a: refused a connection from") for line in warnings_from(caplog))


# --- the websocket transport -----------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True], ids=["ws", "wss"])
async def test_a_member_accepts_another_websocket_implementation(secure: bool, ca: trustme.CA) -> None:
    """trio-websocket's client, speaking the protocol as documented, is a member like any other: it opens
    ws:// (or wss://) host:port/graft-raft, runs the handshake, and its frames arrive in order, one or
    several to a message; its ping is answered."""
    tls = tls_config(ca) if secure else None
    secret = b"interop"
    inbox = Inbox()
    async with WebsocketTransport(tls=tls, cluster_secret=secret).open_endpoint("b", "127.0.0.1:0", inbox) as endpoint:
        b = as_link(endpoint)
        with trio.fail_after(GUARD):
            async with trio_websocket_peer(b.address, tls=tls) as peer:
                await dial_handshake(peer, "x", "x.fake:1", secret)
                await peer.send_frames([encode_message(beat("x", "b", 0)), encode_message(beat("x", "b", 1))])
                await peer.send_frames([encode_message(beat("x", "b", 2))])
                await inbox.wait_for_count(3)
                await peer.websocket.ping(b"still there?")
        assert inbox.sequence_from("x") == [0, 1, 2]
        assert b.peer_address("x") == "x.fake:1"


async def test_a_member_dials_another_websocket_implementation() -> None:
    """A trio-websocket server at /graft-raft receives a member's handshake and messages; the messages
    queued together travel in one websocket message."""
    received: list[Message] = []
    websocket_messages = 0
    done = trio.Event()

    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        nonlocal websocket_messages
        assert request.path == WEBSOCKET_PATH
        peer = TrioWebsocketPeer(await request.accept())
        await accept_handshake(peer, "b", "b.fake:1", b"interop")
        after_handshake = peer.messages_received
        while len(received) < 3:
            received.append(decode_message(await peer.receive_frame(1024)))
        websocket_messages = peer.messages_received - after_handshake
        done.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, serve, "127.0.0.1", 0, None)
        async with WebsocketTransport(cluster_secret=b"interop").open_endpoint("a", "127.0.0.1:0", Inbox()) as a:
            for sequence in range(3):
                a.send("b", f"127.0.0.1:{server.port}", beat("a", "b", sequence))
            with trio.fail_after(GUARD):
                await done.wait()
        nursery.cancel_scope.cancel()
    assert received == [beat("a", "b", sequence) for sequence in range(3)]
    assert websocket_messages == 1  # queued before the connection opened, written as one batch


async def test_a_dial_whose_upgrade_is_refused_fails_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    async def refuse(request: trio_websocket.WebSocketRequest) -> None:
        await request.reject(403)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, refuse, "127.0.0.1", 0, None)
        async with WebsocketTransport(cluster_secret="s").open_endpoint("a", "127.0.0.1:0", Inbox()) as endpoint:
            a = as_link(endpoint)
            a.send("b", f"127.0.0.1:{server.port}", beat("a", "b", 0))
            with trio.fail_after(GUARD):
                await a.wait_until(lambda: a.stats.connections_failed >= 1)
        nursery.cancel_scope.cancel()
    assert a.stats.dropped_unsent == 1
    assert any(line.startswith("a: cannot connect to b at 127.0.0.1:") and "HTTP 403" in line
               for line in warnings_from(caplog))


async def test_a_frame_header_over_the_limit_closes_the_websocket_before_any_body() -> None:
    """The limit applies to each frame's length header, whatever the websocket message announces: a
    message that claims a terabyte and starts with a 4 GiB frame header is cut off at once."""
    transport = WebsocketTransport(max_frame_bytes=64 * 1024)
    async with transport.open_endpoint("b", "127.0.0.1:0", Inbox()) as endpoint:
        b = as_link(endpoint)
        with trio.fail_after(GUARD):
            stream, _, raw = await open_raw_websocket(b.address)
            await dial_handshake(raw, "x", "x:1", None)
            # FIN and binary; masked, with a 64-bit length; a zero mask leaves the payload as it is.
            header = bytes([0x82, 0x80 | 127]) + (2**40).to_bytes(8, "big") + b"\0\0\0\0"
            await stream.send_all(header + FRAME_HEADER.pack(2**32 - 1))
            await assert_closed_by_peer(raw)
        assert b.stats.inbound_bad_frames == 1


@pytest.mark.parametrize(
    ("kind", "logged"),
    [
        ("split-frame", "a websocket message ended inside a frame"),
        ("text-message", "a websocket text message"),
        ("reserved-opcode", "invalid websocket data"),
        ("unmasked", "invalid websocket data"),
    ],
)
async def test_websocket_data_that_is_not_whole_frames_closes_only_that_connection(
    kind: str, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    transport = WebsocketTransport()
    inbox = Inbox()
    frame = encode_message(beat("x", "b", 1))
    async with transport.open_endpoint("a", "127.0.0.1:0", Inbox()) as a, transport.open_endpoint(
        "b", "127.0.0.1:0", inbox
    ) as b:
        with trio.fail_after(GUARD):
            stream, protocol, raw = await open_raw_websocket(b.address)
            await dial_handshake(raw, "x", "x.fake:1", None)
            if kind == "split-frame":  # a frame's last bytes in the next message
                data = protocol.send(BytesMessage(data=encode_frames([frame])[:-3]))
                data += protocol.send(BytesMessage(data=frame[-3:]))
            elif kind == "text-message":
                data = protocol.send(TextMessage(data="hello"))
            elif kind == "reserved-opcode":
                data = bytes([0x83, 0x80]) + b"\0\0\0\0"
            else:  # a client's frames must be masked
                data = bytes([0x82, len(frame) + 4]) + encode_frames([frame])
            await stream.send_all(data)
            await assert_closed_by_peer(raw)
            a.send("b", b.address, beat("a", "b", 0))
            await inbox.wait_for_count(1)
        assert inbox.messages == [beat("a", "b", 0)]
        assert as_link(b).stats.inbound_bad_frames == 1
    assert any(logged in line and "member x at x.fake:1" in line for line in warnings_from(caplog))


async def test_requests_that_are_not_the_graft_websocket_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    inbox = Inbox()
    async with WebsocketTransport(handshake_timeout=0.3).open_endpoint("b", "127.0.0.1:0", inbox) as endpoint:
        b = as_link(endpoint)
        host, port = parse_address(b.address)
        with trio.fail_after(GUARD):
            with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                async with trio_websocket_peer(b.address, path="/elsewhere"):
                    pass
            assert rejected.value.status_code == 404
            for request in (b"GET /graft-raft HTTP/1.1\r\nHost: b\r\n\r\n", b"\x16\x03\x01 not HTTP\r\n\r\n"):
                stream = await trio.open_tcp_stream(host, port)
                await stream.send_all(request)
                assert (await receive_until_closed(stream)).startswith(b"HTTP/1.1 400 ")
            silent = await trio.open_tcp_stream(host, port)
            assert await receive_until_closed(silent) == b""  # after the handshake timeout
            probe = await trio.open_tcp_stream(host, port)  # connects and hangs up: refused quietly
            await probe.aclose()
            await b.wait_until(lambda: b.stats.inbound_refused == 5)
    assert not inbox.messages
    refusals = [line for line in warnings_from(caplog) if line.startswith("b: refused a connection from 127.0.0.1:")]
    assert len(refusals) == 4
    assert any("websocket request for '/elsewhere', not '/graft-raft'" in line for line in refusals)
    assert sum("not a websocket upgrade" in line for line in refusals) == 2
    assert any("handshake timed out" in line for line in refusals)


async def receive_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await stream.receive_some():
            received += data
    await stream.aclose()
    return received


# --- by name, and under Raft --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [("tcp", TcpTransport), ("websocket", WebsocketTransport)])
def test_a_network_transport_is_found_by_name_with_its_options(name: str, kind: type[LinkTransport]) -> None:
    assert name in available_transports()
    transport = load_transport(name, cluster_secret="s3cret", max_frame_bytes=8 * 1024 * 1024, queue_bytes=64 << 20)
    assert isinstance(transport, kind)
    assert transport.options.cluster_secret == b"s3cret"
    assert transport.options.max_frame_bytes == 8 * 1024 * 1024
    with pytest.raises(TypeError):
        load_transport(name, no_such_option=1)


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
async def test_raft_members_over_a_network_transport_elect_a_leader_replicate_and_admit_a_joining_member(
    transport: str,
) -> None:
    addresses = free_tcp_addresses(4)
    ids = ["n1", "n2", "n3"]
    options = {"cluster_secret": f"raft over {transport}", "backoff_max": 0.2}
    config = RaftConfig(tick_interval=0.02, durable=False)

    def member(node_id: str, address: str, peers: dict[str, str], *, join: bool = False) -> RaftNode:
        return RaftNode(
            node_id, address, peers, state_machine=KeyValue(), transport=transport, transport_options=options,
            config=config, join=join,
        )

    founders = {node_id: dict(zip(ids, addresses, strict=False)) for node_id in ids}
    nodes = [member(node_id, founders[node_id][node_id], founders[node_id]) for node_id in ids]
    joiner = member("n4", addresses[3], {}, join=True)  # knows no one, holds no election
    async with contextlib.AsyncExitStack() as stack:
        for node in [*nodes, joiner]:
            await stack.enter_async_context(node)
        with trio.fail_after(GUARD):
            leader_id = await nodes[0].wait_for_leader()
            assert all([await node.wait_for_leader() == leader_id for node in nodes])
            assert await nodes[1].propose(put("k", "v")) == b"v"  # forwarded unless n2 leads
            assert await nodes[2].read(b"k") == b"v"
            # The joiner answers the leader through the address its transport learned from the hello.
            leader = next(node for node in nodes if node.node_id == leader_id)
            await leader.add_member("n4", addresses[3])
            assert await joiner.read(b"k") == b"v"
            assert await joiner.propose(put("k", "w")) == b"w"
