"""The link layer every network transport shares: per-peer send queues and writers, reconnection with
backoff, the authenticated accept side, and the endpoint that ties them to a member.

A network transport subclasses `LinkTransport` and supplies two methods: `connect(address)` opens a
`FramedConnection` to a peer (TCP: a socket, TLS when configured), and `serve(address, handler)` binds
`address` and hands every accepted connection to `handler`. Everything else lives here, so TCP and
websocket behave alike:

- **Sending.** Each (peer id, address) gets a `_Link`: a queue bounded in messages and bytes, and one
  writer task that dials the peer, runs the handshake, and then writes everything queued in one write.
  That connection only ever carries this member's messages to that peer, so the link keeps their order;
  a slow or dead peer only fills its own queue (further messages to it are dropped and counted).
- **Reconnecting.** A writer dials only when it has something to send. After a failed attempt the queue
  is discarded (Raft resends what still matters) and the next attempt waits a backoff with full jitter.
- **Receiving.** Each accepted connection is authenticated (`_handshake.py`) under a timeout before any
  frame after the handshake is read; then its frames are decoded and handed to the member in order. A
  frame over the limit, one that does not decode, or a message that claims another sender or recipient
  closes that connection only, and is logged with the peer's address.

Logs go to the ``graft_trio.transport`` logger; counters are on `LinkEndpoint.stats`.
"""

from __future__ import annotations

import abc
import logging
import math
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from graft_trio.raft.codec import CodecError, decode_message, encode_message
from graft_trio.raft.messages import Message
from graft_trio.transport import Endpoint, MessageHandler, TlsConfig, Transport, TransportError
from transports._framing import LARGEST_FRAME, ConnectionLostError, FramedConnection, FrameError, describe
from transports._handshake import HANDSHAKE_FRAME_LIMIT, Hello, accept_handshake, dial_handshake

logger = logging.getLogger("graft_trio.transport")

MIB = 1024 * 1024
MAX_NAME_BYTES = 1024  # of a node id or an address, so that a hello fits its frame limit
DROP_LOG_INTERVAL = 10.0  # seconds between two log lines about one link's dropped messages

ConnectionHandler = Callable[[FramedConnection], Awaitable[None]]
"""What `LinkTransport.serve` calls with each accepted connection (in a task of its own)."""

# What opening a connection may raise: refused or unreachable (OSError), TLS failures (trio wraps them in
# BrokenResourceError), and the transport's own errors.
_CONNECT_ERRORS = (OSError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError)


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if isinstance(secret, str):
        secret = secret.encode()
    if secret is not None and not secret:
        raise ValueError("cluster_secret must not be empty")
    return secret


@attrs.frozen
class LinkOptions:
    """The options every network transport takes (as keyword arguments of its constructor).

    - `cluster_secret`: members prove they know it in the handshake (HMAC-SHA256); str or bytes.
    - `tls`: mutual TLS (`TlsConfig`); may be combined with `cluster_secret`.
    - `max_frame_bytes`: the largest frame sent or accepted. It must exceed the largest Raft message: an
      AppendEntries of `RaftConfig.max_message_bytes` (1 MiB) of entries, or an InstallSnapshot chunk
      of `snapshot_chunk_bytes` (512 KiB), plus their headers, or a single entry larger than that.
    - `queue_messages`, `queue_bytes`: the bound of each peer's send queue.
    - `backoff_initial`, `backoff_max`: the reconnection backoff, in seconds (full jitter).
    - `connect_timeout`: to open a connection (TCP connect, the TLS handshake, the websocket upgrade).
    - `handshake_timeout`: for the hello exchange and proofs, on both sides.
    - `write_timeout`: a write that makes no headway for this long closes the connection (None: never).
    - `max_pending_handshakes`: accepted connections still in their handshake; more are closed at once.
    """

    cluster_secret: bytes | None = attrs.field(default=None, converter=_secret_bytes, repr=False)
    tls: TlsConfig | None = None
    max_frame_bytes: int = 4 * MIB
    queue_messages: int = 4096
    queue_bytes: int = 32 * MIB
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    write_timeout: float | None = 30.0
    max_pending_handshakes: int = 64

    def __attrs_post_init__(self) -> None:
        for name in ("backoff_initial", "backoff_max", "connect_timeout", "handshake_timeout", "write_timeout",
                     "max_pending_handshakes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        if not HANDSHAKE_FRAME_LIMIT <= self.max_frame_bytes <= LARGEST_FRAME:
            raise ValueError(f"max_frame_bytes must be in [{HANDSHAKE_FRAME_LIMIT}, {LARGEST_FRAME}]")
        if self.queue_messages < 1:
            raise ValueError("queue_messages must be at least 1")
        if self.queue_bytes < self.max_frame_bytes:
            raise ValueError("queue_bytes must be at least max_frame_bytes, or the largest message never fits")
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")

    @property
    def authenticated(self) -> bool:
        return self.cluster_secret is not None or self.tls is not None


def backoff_delay(failures: int, initial: float, maximum: float, rng: random.Random) -> float:
    """The wait before the next attempt after `failures` failures in a row: full jitter, i.e. uniform in
    [0, min(maximum, initial * 2**(failures - 1))], so that members that lost a peer together do not
    all come back at once."""
    if failures <= 0:
        return 0.0
    ceiling = min(maximum, initial * 2.0 ** min(failures - 1, 64))
    return rng.uniform(0.0, ceiling)


@attrs.define
class LinkStats:
    """An endpoint's counters (messages are Raft messages; one message is one frame)."""

    messages_sent: int = 0  # written to a connection
    messages_received: int = 0  # handed to the member
    dropped_queue_full: int = 0  # the peer's queue was full
    dropped_oversized: int = 0  # encoded, over max_frame_bytes (or not encodable at all)
    dropped_unsent: int = 0  # queued or being written when a connection failed or could not be opened
    connections_opened: int = 0  # outbound connections that completed the handshake
    connections_failed: int = 0  # outbound attempts that failed (connect, TLS, handshake, wrong peer)
    connections_lost: int = 0  # outbound connections that closed or broke after opening
    inbound_accepted: int = 0  # inbound connections that completed the handshake
    inbound_refused: int = 0  # inbound connections closed during or before the handshake
    inbound_bad_frames: int = 0  # inbound connections closed for an oversized or malformed frame


class _Link:
    """What this member sends to one peer: a bounded FIFO of encoded frames, drained by one writer."""

    def __init__(self, target_id: str, address: str, max_messages: int, max_bytes: int) -> None:
        self.target_id = target_id
        self.address = address
        self.frames: deque[bytes] = deque()
        self.queued_bytes = 0
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.connected = False
        self.last_failure: str | None = None  # repeated identical failures are logged at debug level
        self.dropped = 0
        self.last_drop_log = -math.inf
        self._ready = trio.Event()

    def put(self, frame: bytes) -> bool:
        if len(self.frames) >= self.max_messages or self.queued_bytes + len(frame) > self.max_bytes:
            return False
        self.frames.append(frame)
        self.queued_bytes += len(frame)
        self._ready.set()
        return True

    async def wait_for_frames(self) -> None:
        while not self.frames:
            self._ready = trio.Event()
            await self._ready.wait()

    def take_all(self) -> list[bytes]:
        frames = list(self.frames)
        self.frames.clear()
        self.queued_bytes = 0
        return frames

    def describe(self) -> str:
        return f"{self.target_id} at {self.address}"


class LinkEndpoint(Endpoint):
    """One member on a network transport. Built by `LinkTransport.open_endpoint`, which runs its tasks."""

    def __init__(
        self,
        transport: LinkTransport,
        node_id: str,
        address: str,
        on_message: MessageHandler,
        nursery: trio.Nursery,
    ) -> None:
        self.node_id = node_id
        self.address = address  # the address asked for until bound, then the bound one (port 0 resolved)
        self.stats = LinkStats()
        self._transport = transport
        self._options = transport.options
        self._on_message = on_message
        self._nursery = nursery
        self._links: dict[tuple[str, str], _Link] = {}
        self._learned_addresses: dict[str, str] = {}
        self._inbound: dict[str, trio.CancelScope] = {}
        self._pending_handshakes = 0
        self._changed: trio.Event | None = None
        self._closed = False

    # --- the member's side -------------------------------------------------------------------------

    def send(self, target_id: str, target_address: str, message: Message) -> None:
        if self._closed:
            return
        try:
            frame = encode_message(message)
        except CodecError as exc:
            self.stats.dropped_oversized += 1
            logger.warning("%s: dropped a %s to %s that cannot be encoded: %s", self.node_id,
                           type(message).__name__, target_id, exc)
            self._notify()
            return
        if len(frame) > self._options.max_frame_bytes:
            self.stats.dropped_oversized += 1
            logger.warning("%s: dropped a %s of %d bytes to %s at %s: over max_frame_bytes (%d)", self.node_id,
                           type(message).__name__, len(frame), target_id, target_address,
                           self._options.max_frame_bytes)
            self._notify()
            return
        key = (target_id, target_address)
        link = self._links.get(key)
        if link is None:
            link = _Link(target_id, target_address, self._options.queue_messages, self._options.queue_bytes)
            self._links[key] = link
            self._nursery.start_soon(self._run_link, link, name=f"graft-trio link {self.node_id}->{target_id}")
        if not link.put(frame):
            self.stats.dropped_queue_full += 1
            link.dropped += 1
            now = trio.current_time()
            if now - link.last_drop_log >= DROP_LOG_INTERVAL:
                link.last_drop_log = now
                logger.warning("%s: send queue to %s is full (%d messages, %d bytes); dropped %d so far",
                               self.node_id, link.describe(), len(link.frames), link.queued_bytes, link.dropped)
            self._notify()

    def peer_address(self, node_id: str) -> str | None:
        return self._learned_addresses.get(node_id)

    def inbound_peers(self) -> set[str]:
        """The node ids with an authenticated connection open to this member."""
        return set(self._inbound)

    @property
    def pending_handshakes(self) -> int:
        """Accepted connections still in their handshake."""
        return self._pending_handshakes

    def connected_peers(self) -> set[str]:
        """The node ids this member has an open sending connection to."""
        return {link.target_id for link in self._links.values() if link.connected}

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` is true; it is checked again whenever the counters or connections
        change. Bound it with a timeout."""
        while not predicate():
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _close(self) -> None:
        self._closed = True

    # --- sending ------------------------------------------------------------------------------------

    async def _run_link(self, link: _Link) -> None:
        """The writer of one link, for the endpoint's lifetime: connect when there is something to send,
        write batches until the connection fails, back off, repeat."""
        options = self._options
        failures = 0
        retry_at = -math.inf
        while True:
            await link.wait_for_frames()
            await trio.sleep_until(retry_at)
            opened_at = trio.current_time()
            connection = await self._open_link(link)
            if connection is None:
                failures += 1
                self._discard(link)
                retry_at = trio.current_time() + backoff_delay(
                    failures, options.backoff_initial, options.backoff_max, self._transport.rng
                )
                continue
            try:
                link.connected = True
                self._notify()
                await self._pump(link, connection)
            finally:
                link.connected = False
                await connection.aclose()
            self.stats.connections_lost += 1
            self._notify()
            # A connection that lived reconnects at once (the peer restarted, say); one that failed soon
            # after opening (the peer refuses us after the handshake) backs off like a failed attempt.
            failures = 0 if trio.current_time() - opened_at >= options.backoff_max else failures + 1
            retry_at = trio.current_time() + backoff_delay(
                failures, options.backoff_initial, options.backoff_max, self._transport.rng
            )

    def _discard(self, link: _Link) -> None:
        dropped = len(link.take_all())
        if dropped:
            self.stats.dropped_unsent += dropped
            logger.debug("%s: discarded %d messages to %s: not connected", self.node_id, dropped, link.describe())
        self._notify()

    async def _open_link(self, link: _Link) -> FramedConnection | None:
        """A connection to the link's peer, handshake done and the peer checked; None (logged) on failure."""
        options = self._options
        connection: FramedConnection | None = None
        phase = "connect"
        try:
            with trio.fail_after(options.connect_timeout):
                connection = await self._transport.connect(link.address)
            phase = "handshake"
            with trio.fail_after(options.handshake_timeout):
                hello = await dial_handshake(connection, self.node_id, self.address, options.cluster_secret)
            if hello.node_id != link.target_id:
                raise _WrongPeerError(f"{link.address} is member {hello.node_id!r}, not {link.target_id!r}")
        except (*_CONNECT_ERRORS, trio.TooSlowError) as exc:
            if connection is not None:
                await connection.aclose()
            self.stats.connections_failed += 1
            reason = f"{phase} timed out" if isinstance(exc, trio.TooSlowError) else describe(exc)
            if reason == link.last_failure:
                level = logging.DEBUG
            elif _is_refusal(exc):
                level = logging.WARNING  # refused by TLS or the handshake: a configuration or security problem
            else:
                level = logging.INFO
            link.last_failure = reason
            logger.log(level, "%s: cannot connect to %s: %s", self.node_id, link.describe(), reason)
            return None
        self.stats.connections_opened += 1
        if link.last_failure is not None:
            logger.info("%s: connected to %s", self.node_id, link.describe())
        link.last_failure = None
        return connection

    async def _pump(self, link: _Link, connection: FramedConnection) -> None:
        """Write the link's queue to `connection` until it fails or the peer closes it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, link, connection, nursery.cancel_scope)
            frames: list[bytes] = []  # taken from the queue, not yet known to be written
            try:
                while True:
                    await link.wait_for_frames()
                    frames = link.take_all()
                    with trio.move_on_after(self._options.write_timeout or math.inf) as write_scope:
                        await connection.send_frames(frames)
                    if write_scope.cancelled_caught:
                        raise ConnectionLostError(f"a write did not finish in {self._options.write_timeout} s")
                    self.stats.messages_sent += len(frames)
                    frames = []
            except ConnectionLostError as exc:
                logger.info("%s: connection to %s lost: %s", self.node_id, link.describe(), describe(exc))
            finally:
                self.stats.dropped_unsent += len(frames)
            nursery.cancel_scope.cancel()

    async def _watch(self, link: _Link, connection: FramedConnection, scope: trio.CancelScope) -> None:
        """Notice at once when the peer closes a sending connection, so that the next message goes out on
        a new one instead of into a dead socket. The peer never sends on it after the handshake."""
        try:
            await connection.receive_frame(HANDSHAKE_FRAME_LIMIT)
            logger.warning("%s: %s sent data on a sending connection; closing it", self.node_id, link.describe())
        except (ConnectionLostError, FrameError) as exc:
            logger.info("%s: connection to %s closed: %s", self.node_id, link.describe(), describe(exc))
        scope.cancel()

    # --- receiving ----------------------------------------------------------------------------------

    async def serve_connection(self, connection: FramedConnection) -> None:
        """The `ConnectionHandler` of this endpoint: authenticate an accepted connection, then hand its
        messages to the member until it closes. Closes `connection` before returning."""
        try:
            if self._pending_handshakes >= self._options.max_pending_handshakes:
                self.stats.inbound_refused += 1
                logger.warning("%s: refused a connection from %s: %d handshakes already in progress",
                               self.node_id, connection.peer, self._pending_handshakes)
                return
            self._pending_handshakes += 1
            self._notify()
            try:
                hello = await self._accept(connection)
            finally:
                self._pending_handshakes -= 1
            if hello is not None:
                await self._receive_from(connection, hello)
        finally:
            self._notify()
            await connection.aclose()

    async def _accept(self, connection: FramedConnection) -> Hello | None:
        options = self._options
        try:
            with trio.fail_after(options.handshake_timeout):
                return await accept_handshake(connection, self.node_id, self.address, options.cluster_secret)
        except (TransportError, trio.TooSlowError) as exc:
            self.stats.inbound_refused += 1
            quiet = isinstance(exc, ConnectionLostError) and exc.clean  # e.g. a port probe
            reason = "handshake timed out" if isinstance(exc, trio.TooSlowError) else describe(exc)
            logger.log(logging.INFO if quiet else logging.WARNING, "%s: refused a connection from %s: %s",
                       self.node_id, connection.peer, reason)
            return None

    async def _receive_from(self, connection: FramedConnection, hello: Hello) -> None:
        peer_id = hello.node_id
        if hello.address:
            self._learned_addresses[peer_id] = hello.address
        previous = self._inbound.get(peer_id)
        if previous is not None:
            # The peer opened a new connection, so the old one is dead or dying; reading both could
            # reorder its messages.
            previous.cancel()
        with trio.CancelScope() as scope:
            self._inbound[peer_id] = scope
            self.stats.inbound_accepted += 1
            self._notify()
            try:
                await self._receive_loop(connection, peer_id)
            except FrameError as exc:
                self.stats.inbound_bad_frames += 1
                logger.warning("%s: closed the connection from %s (member %s at %s): %s", self.node_id,
                               connection.peer, peer_id, hello.address, exc)
            except ConnectionLostError as exc:
                logger.debug("%s: connection from %s (member %s) closed: %s", self.node_id, connection.peer,
                             peer_id, describe(exc))
            finally:
                if self._inbound.get(peer_id) is scope:
                    del self._inbound[peer_id]

    async def _receive_loop(self, connection: FramedConnection, peer_id: str) -> None:
        limit = self._options.max_frame_bytes
        stats, on_message = self.stats, self._on_message
        while True:
            frame = await connection.receive_frame(limit)
            try:
                message = decode_message(frame)
            except CodecError as exc:
                raise FrameError(f"malformed message: {exc}") from exc
            if message.source != peer_id or message.target != self.node_id:
                raise FrameError(f"a message from {message.source!r} to {message.target!r} on the connection "
                                 f"of {peer_id!r} to {self.node_id!r}")
            stats.messages_received += 1
            on_message(message)


def _is_refusal(exc: BaseException) -> bool:
    """Whether a failure to connect is an authentication or protocol refusal rather than a network error."""
    if isinstance(exc, TransportError) and not isinstance(exc, ConnectionLostError):
        return True
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _WrongPeerError(TransportError):
    """The address answered with another member's id (a stale address, or a misconfiguration)."""


class LinkTransport(Transport):
    """A network transport: the link layer above, over the connections a subclass opens and accepts.

    The constructor takes the `LinkOptions` as keyword arguments, and `rng`, the `random.Random` used
    for backoff jitter (one of its own by default; never the global one).
    """

    def __init__(
        self,
        *,
        cluster_secret: str | bytes | None = None,
        tls: TlsConfig | None = None,
        max_frame_bytes: int = 4 * MIB,
        queue_messages: int = 4096,
        queue_bytes: int = 32 * MIB,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
        write_timeout: float | None = 30.0,
        max_pending_handshakes: int = 64,
        rng: random.Random | None = None,
    ) -> None:
        self.options = LinkOptions(
            cluster_secret=cluster_secret,  # converted to bytes
            tls=tls,
            max_frame_bytes=max_frame_bytes,
            queue_messages=queue_messages,
            queue_bytes=queue_bytes,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            connect_timeout=connect_timeout,
            handshake_timeout=handshake_timeout,
            write_timeout=write_timeout,
            max_pending_handshakes=max_pending_handshakes,
        )
        self.rng = rng if rng is not None else random.Random()

    @abc.abstractmethod
    async def connect(self, address: str) -> FramedConnection:
        """Open a connection to `address` (with TLS when configured), ready for the handshake.

        Raise `OSError`, a `TransportError` or trio's `BrokenResourceError` if it cannot be opened; the
        caller bounds it with `connect_timeout`, so leave nothing open when cancelled.
        """

    @abc.abstractmethod
    async def serve(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind `address`, report the bound address (port 0 resolved) through `task_status`, then run
        `handler(connection)` in a task of its own for every connection accepted, until cancelled.

        Anything slow before `handler` is called (a TLS handshake) must either happen inside it (a lazy
        TLS handshake does, under the handler's handshake timeout) or be bounded here. Closing the
        listener and every connection when cancelled is this method's job.
        """

    @asynccontextmanager
    async def open_endpoint(
        self, node_id: str, address: str, on_message: MessageHandler
    ) -> AsyncIterator[LinkEndpoint]:
        """Bind `address` (the listener is accepting when this yields; `endpoint.address` is the bound
        address), yield the endpoint, and on leaving cancel every task and close every connection."""
        for name, value in (("node_id", node_id), ("address", address)):
            if not 0 < len(value.encode()) <= MAX_NAME_BYTES:
                raise ValueError(f"{name} must be 1 to {MAX_NAME_BYTES} bytes of UTF-8: {value!r}")
        raised: BaseException | None = None
        async with trio.open_nursery() as nursery:
            endpoint = LinkEndpoint(self, node_id, address, on_message, nursery)
            try:
                endpoint.address = await nursery.start(self.serve, address, endpoint.serve_connection)
                if not self.options.authenticated:
                    logger.warning("%s: the %s transport at %s runs unauthenticated: any host that reaches it can "
                                   "take part in Raft; set cluster_secret or tls", node_id, self.name,
                                   endpoint.address)
                yield endpoint
            except BaseException as exc:
                # Re-raised below, outside the nursery, so that the caller sees its own exception and not
                # an exception group around it.
                raised = exc
            finally:
                endpoint._close()
                nursery.cancel_scope.cancel()
        if raised is not None:
            raise raised
