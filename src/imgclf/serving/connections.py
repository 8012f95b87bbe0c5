"""A deadline for a request's headers: a client that opens a connection and sends its request line and
headers slowly (or nothing) is dropped after HEADER_TIMEOUT seconds.

uvicorn times a connection out only between requests (keep-alive, 5 s) and only once a response was
sent, so a connection that never finishes its headers was held for ever: 256 such connections (the
server's ``limit_concurrency``) and every other client got 503 ("slowloris"). The timer starts when the
connection opens and again when a response is complete, and stops once the headers are in; the body
has its own deadline (``middleware.BODY_TIMEOUT``). The server speaks HTTP/1.1 through h11 (uvicorn's
own dependency), whose protocol this extends.
"""

from __future__ import annotations

import asyncio

from imgclf.logs import get_logger

log = get_logger("serve")
HEADER_TIMEOUT = 20.0  # seconds from a connection's start (or its last response) to its request's last header


def header_deadline_protocol() -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with the header deadline (imported here: uvicorn is the optional [serve] extra)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection is done)
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request's headers get the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.header_timer = self.loop.call_later(HEADER_TIMEOUT, self._drop)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _drop(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing():
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                log.info("serve: dropped %s: its request headers did not arrive within %g s", client, HEADER_TIMEOUT)
                self.transport.close()

    return HeaderDeadline
