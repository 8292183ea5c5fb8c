"""A raw HTTP/2 gRPC client on a plain socket (the `h2` package), for what real gRPC clients
never do: send half a message and stall, send bytes that are no message, send header values a
gRPC library would refuse. Also records the server's PINGs and GOAWAY."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass
class Stream:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    @property
    def meta(self) -> dict[bytes, bytes]:
        """Trailers, or the headers of a trailers-only response."""
        return {**self.headers, **self.trailers}

    @property
    def grpc_status(self) -> int | None:
        value = self.meta.get(b"grpc-status")
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str:
        return unquote(self.meta.get(b"grpc-message", b"").decode())


class H2Client:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.authority = f"{host}:{port}".encode()
        self.streams: dict[int, Stream] = {}
        self.pings = 0
        self.goaway = False
        self.closed = False
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def open(self, path: str, extra: Iterable[tuple[bytes, bytes]] = ()) -> int:
        """A new gRPC call's HEADERS (no body yet); returns the stream id."""
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", self.authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *extra,
        ]
        self.conn.send_headers(sid, headers)
        self.streams[sid] = Stream()
        self._flush()
        return sid

    def send(self, sid: int, data: bytes, *, end: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end)
        self._flush()

    def call(
        self,
        path: str,
        message: bytes,
        extra: Iterable[tuple[bytes, bytes]] = (),
        timeout: float = 30,
    ) -> Stream:
        """A whole unary call: HEADERS, one message, END_STREAM; waits for its end."""
        sid = self.open(path, extra)
        self.send(sid, grpc_frame(message), end=True)
        stream = self.streams[sid]
        assert self.pump(lambda: stream.done, timeout), f"stream {sid} did not end"
        return stream

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        """Read and handle frames until `until()` holds, the socket closes, or `timeout`."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return until()
            readable, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if not readable:
                continue
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, OSError):
                chunk = b""
            if not chunk:
                self.closed = True
                continue
            try:
                events = self.conn.receive_data(chunk)
            except h2.exceptions.ProtocolError:
                # h2 closes its side on GOAWAY (the frame may share this read with the next
                # ones, whose events are then lost); the server may go on pinging until it
                # closes the connection.
                if self.conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                    raise
                self.goaway = True
                continue
            for event in events:
                self._handle(event)
            self._flush()
        return True

    def _handle(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        stream = self.streams.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = dict(event.headers)
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.trailers = dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            if stream is not None:
                stream.data += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset = event.error_code
        elif isinstance(event, h2.events.PingReceived):
            self.pings += 1
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
