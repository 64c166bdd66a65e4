"""The handshake that opens every connection of a network transport, before any Raft message.

The dialer and the listener exchange a `Hello` (protocol version, role, authentication mode, a fresh
random nonce, node id, listen address). With a cluster secret each side then proves that it knows the
secret: an HMAC-SHA256, keyed with the secret, over a transcript of both hellos exactly as sent, labelled
with the prover's role. Both nonces make a proof useless in any other connection (no replay); the role
label and the role byte in each hello make the listener's proof useless as a dialer's (no reflection).
The listener proves first, so a dialer never computes a proof for a peer that has not proved itself.

    dialer                                                  listener
      │ ── Hello(dialer, nonce_d) ──────────────────────────>  │
      │ <── Hello(listener, nonce_l), proof_l ───────────────  │   proof_l = MAC("listener", transcript)
      │ ── proof_d ─────────────────────────────────────────>  │   proof_d = MAC("dialer", transcript)
      │ ── Raft frames ...                                     │   read only once proof_d is verified

    transcript = u32 len(hello_d) ‖ hello_d ‖ u32 len(hello_l) ‖ hello_l
    MAC(role, t) = HMAC-SHA256(secret, b"graft-trio handshake 1\\0" ‖ role ‖ b"\\0" ‖ t)

Without a secret the proofs are left out (and a peer that sends or expects them is refused: both sides
must be configured alike). The functions here raise `HandshakeError` on anything unexpected; the caller
bounds them with its handshake timeout. docs/TRANSPORTS.md has the byte layout.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct

import attrs

from graft_trio.transport import TransportError
from transports._framing import ConnectionLostError, FramedConnection

PROTOCOL_VERSION = 1
MAGIC = b"GRFT"
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
HANDSHAKE_FRAME_LIMIT = 4096  # no handshake frame is longer; a peer cannot make us buffer more before it proves itself
_HELLO_HEADER = struct.Struct(f">4sBBB{NONCE_BYTES}s")
_TEXT_LENGTH = struct.Struct(">H")
_TRANSCRIPT_LENGTH = struct.Struct(">I")
_MAC_DOMAIN = b"graft-trio handshake 1\0"


class HandshakeError(TransportError):
    """The peer is refused: it failed to authenticate, or sent a handshake this side does not accept."""


class Role(enum.IntEnum):
    DIALER = 1
    LISTENER = 2


class Auth(enum.IntEnum):
    NONE = 0
    HMAC_SHA256 = 1


@attrs.frozen
class Hello:
    role: Role
    auth: Auth
    nonce: bytes
    node_id: str
    address: str
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        node_id, address = self.node_id.encode(), self.address.encode()
        return b"".join(
            [
                _HELLO_HEADER.pack(MAGIC, self.version, self.role, self.auth, self.nonce),
                _TEXT_LENGTH.pack(len(node_id)),
                node_id,
                _TEXT_LENGTH.pack(len(address)),
                address,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> Hello:
        """The hello in `data`; `HandshakeError`, and nothing else, if `data` is not exactly one hello."""
        if not data.startswith(MAGIC):
            raise HandshakeError("not a graft-trio hello")
        if len(data) < _HELLO_HEADER.size:
            raise HandshakeError("hello ends early")
        _, version, role, auth, nonce = _HELLO_HEADER.unpack_from(data, 0)
        if version != PROTOCOL_VERSION:
            raise HandshakeError(f"handshake protocol version {version}, this member speaks {PROTOCOL_VERSION}")
        offset = _HELLO_HEADER.size
        texts: list[str] = []
        for _ in range(2):
            if offset + _TEXT_LENGTH.size > len(data):
                raise HandshakeError("hello ends early")
            (length,) = _TEXT_LENGTH.unpack_from(data, offset)
            offset += _TEXT_LENGTH.size
            if offset + length > len(data):
                raise HandshakeError("hello ends early")
            try:
                texts.append(data[offset : offset + length].decode())
            except UnicodeDecodeError as exc:
                raise HandshakeError(f"hello with invalid UTF-8: {exc}") from exc
            offset += length
        if offset != len(data):
            raise HandshakeError("bytes after the hello")
        try:
            role, auth = Role(role), Auth(auth)
        except ValueError as exc:
            raise HandshakeError(f"unknown role or authentication mode: {exc}") from exc
        if not texts[0]:
            raise HandshakeError("hello without a node id")
        return cls(role, auth, nonce, texts[0], texts[1], version)


def new_hello(role: Role, node_id: str, address: str, secret: bytes | None) -> Hello:
    return Hello(
        role,
        Auth.HMAC_SHA256 if secret is not None else Auth.NONE,
        secrets.token_bytes(NONCE_BYTES),
        node_id,
        address,
    )


def proof(secret: bytes, prover: Role, dialer_hello: bytes, listener_hello: bytes) -> bytes:
    """What `prover` sends to show it knows `secret`, in the connection whose hellos were these bytes."""
    message = b"".join(
        [
            _MAC_DOMAIN,
            prover.name.lower().encode(),
            b"\0",
            _TRANSCRIPT_LENGTH.pack(len(dialer_hello)),
            dialer_hello,
            _TRANSCRIPT_LENGTH.pack(len(listener_hello)),
            listener_hello,
        ]
    )
    return hmac.new(secret, message, hashlib.sha256).digest()


def _check_peer_hello(peer: Hello, expected_role: Role, ours: Hello) -> None:
    if peer.role != expected_role:
        raise HandshakeError(f"peer says it is the {peer.role.name.lower()}, expected the {expected_role.name.lower()}")
    if peer.auth != ours.auth:
        if ours.auth == Auth.HMAC_SHA256:
            raise HandshakeError("peer does not authenticate with a cluster secret, and this member requires one")
        raise HandshakeError("peer authenticates with a cluster secret, and this member has none configured")
    if peer.nonce == ours.nonce:
        raise HandshakeError("peer echoed this member's nonce")


async def _receive_proof(connection: FramedConnection) -> bytes:
    received = await connection.receive_frame(HANDSHAKE_FRAME_LIMIT)
    if len(received) != PROOF_BYTES:
        raise HandshakeError(f"proof of {len(received)} bytes, expected {PROOF_BYTES}")
    return received


async def dial_handshake(connection: FramedConnection, node_id: str, address: str, secret: bytes | None) -> Hello:
    """Open `connection` as the dialer; returns the listener's hello once the listener is authenticated.

    Raises `HandshakeError` if the listener is refused, `ConnectionLostError`/`FrameError` if the
    connection fails. The caller sends Raft frames right after (the listener checks this side's proof
    before it reads them).
    """
    ours = new_hello(Role.DIALER, node_id, address, secret)
    ours_bytes = ours.encode()
    await connection.send_frames([ours_bytes])
    theirs_bytes = await connection.receive_frame(HANDSHAKE_FRAME_LIMIT)
    theirs = Hello.decode(theirs_bytes)
    _check_peer_hello(theirs, Role.LISTENER, ours)
    if secret is not None:
        received = await _receive_proof(connection)
        if not hmac.compare_digest(received, proof(secret, Role.LISTENER, ours_bytes, theirs_bytes)):
            raise HandshakeError("wrong cluster secret: the listener's proof does not verify")
        await connection.send_frames([proof(secret, Role.DIALER, ours_bytes, theirs_bytes)])
    return theirs


async def accept_handshake(connection: FramedConnection, node_id: str, address: str, secret: bytes | None) -> Hello:
    """Open `connection` as the listener; returns the dialer's hello once the dialer is authenticated.

    Raises `HandshakeError` if the dialer is refused; no frame after the handshake has been read then.
    """
    theirs_bytes = await connection.receive_frame(HANDSHAKE_FRAME_LIMIT)
    theirs = Hello.decode(theirs_bytes)
    ours = new_hello(Role.LISTENER, node_id, address, secret)
    _check_peer_hello(theirs, Role.DIALER, ours)
    ours_bytes = ours.encode()
    if secret is None:
        await connection.send_frames([ours_bytes])
        return theirs
    await connection.send_frames([ours_bytes, proof(secret, Role.LISTENER, theirs_bytes, ours_bytes)])
    try:
        received = await _receive_proof(connection)
    except ConnectionLostError as exc:
        raise HandshakeError(f"the dialer hung up before its proof ({exc}): it may have refused ours") from exc
    if not hmac.compare_digest(received, proof(secret, Role.DIALER, theirs_bytes, ours_bytes)):
        raise HandshakeError("wrong cluster secret: the dialer's proof does not verify")
    return theirs
