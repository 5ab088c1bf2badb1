"""NodeSim: the simulated conferencing node as one in-process object (demo, tests, CLI).

Glue between the sans-I/O :class:`NodeState`, the HTTP adapter and the media endpoints: it
owns the listening socket, the clock, the periodic token sweep and the aiortc peer connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from confedge.timers import Sweeper, sweep_interval

from .core import (
    CallRequest,
    Conference,
    JsonResponse,
    NodeState,
    Request,
    StreamRequest,
    Subscription,
    TurnInfo,
)
from .server import (
    HEADER_TIMEOUT,
    HttpResponse,
    NodeHttpProtocol,
    is_direct_loopback,
    static_response,
)

if TYPE_CHECKING:
    from .media import MediaEndpoint

__all__ = ["NodeSim"]

log = logging.getLogger("confedge.nodesim")


class NodeSim:
    """A simulated Pexip Infinity conferencing node on plain HTTP (the proxy terminates TLS).

    ``clock`` is the monotonic time source for token lifetimes; tests may pass their own.
    """

    def __init__(
        self,
        conferences: Iterable[Conference],
        turn: TurnInfo | None = None,
        node_name: str = "nodesim",
        *,
        keepalive: float = 10.0,
        max_calls: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = NodeState(conferences, turn, node_name, wall_clock=time.time)
        self.turn = turn
        self.node_name = node_name
        self.keepalive = keepalive
        self.max_calls = max_calls
        self.clock = clock
        self.media: dict[str, MediaEndpoint] = {}
        self._pending_calls = 0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._protocols: set[NodeHttpProtocol] = set()
        # Header and idle timeouts of its connections (confedge/timers.py).
        self._timers = Sweeper(lambda: self._protocols, sweep_interval(HEADER_TIMEOUT))
        self._closers: set[asyncio.Task[None]] = set()
        self.host = ""
        self.port = 0

    # ---------------------------------------------------------------- public API

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def maintenance(self) -> bool:
        return self.state.maintenance

    def set_maintenance(self, on: bool) -> None:
        """Switch maintenance mode: /status answers 503 and new work is refused."""
        if on == self.state.maintenance:
            return
        self.state.set_maintenance(on)
        log.info("nodesim %s: maintenance %s", self.node_name, "on" if on else "off")

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> NodeHttpProtocol:
            proto = NodeHttpProtocol(
                self._handle,
                self.node_name,
                self.keepalive,
                self._stream_end,
                self._protocols.discard,
                self._timers,
            )
            self._protocols.add(proto)
            return proto

        self._server = await loop.create_server(factory, host, port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = str(sock[0]), int(sock[1])
        self._sweeper = loop.create_task(self._sweep_loop())
        log.info("nodesim %s listening on %s", self.node_name, self.url)

    async def close(self) -> None:
        self._timers.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.close()
        self._protocols.clear()
        endpoints = list(self.media.values())
        self.media.clear()
        await asyncio.gather(*(m.close() for m in endpoints), return_exceptions=True)
        if self._closers:
            await asyncio.gather(*self._closers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> NodeSim:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- internals

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.state.sweep(self.clock())
            self._reap_calls()

    def _stream_end(self, sub: Subscription) -> None:
        self.state.unsubscribe(sub)

    def _reap_calls(self) -> None:
        """Close the media endpoints of calls the core has ended."""
        while self.state.closed_calls:
            call = self.state.closed_calls.pop()
            endpoint = self.media.pop(call, None)
            if endpoint is not None:
                task = asyncio.get_running_loop().create_task(endpoint.close())
                self._closers.add(task)
                task.add_done_callback(self._closers.discard)

    async def _handle(self, req: Request, proto: NodeHttpProtocol) -> HttpResponse | Subscription:
        path = req.path
        if path in ("/", "/webapp"):
            return HttpResponse(302, b"", "text/plain", [("Location", "/webapp/")])
        if path.startswith("/webapp/"):
            if req.method not in ("GET", "HEAD"):
                return HttpResponse.error(405, "Method not allowed")
            return static_response(path)
        if path == "/admin/maintenance":
            return self._admin(req, proto)
        now = self.clock()
        self.state.sweep(now)
        result = self.state.handle(req, now)
        self._reap_calls()
        if isinstance(result, JsonResponse):
            return HttpResponse.from_json(result)
        if isinstance(result, StreamRequest):
            return result.subscription
        return await self._call(result)

    def _admin(self, req: Request, proto: NodeHttpProtocol) -> HttpResponse:
        if not is_direct_loopback(proto, req):
            return HttpResponse.error(403, "The admin path is only for local, unproxied requests")
        if req.method == "POST":
            value = req.query.get("on", "").lower()
            if value in ("1", "true", "yes", "on"):
                self.set_maintenance(True)
            elif value in ("0", "false", "no", "off"):
                self.set_maintenance(False)
            else:
                return HttpResponse.error(400, 'Query parameter "on" must be 1 or 0')
        elif req.method not in ("GET", "HEAD"):
            return HttpResponse.error(405, "Method not allowed")
        return HttpResponse.from_json(
            JsonResponse(200, {"status": "success", "result": {"maintenance": self.maintenance}})
        )

    async def _call(self, creq: CallRequest) -> HttpResponse:
        try:
            from .media import MediaEndpoint, MediaError
        except ImportError as exc:
            return HttpResponse.error(501, str(exc))
        if len(self.media) + self._pending_calls >= self.max_calls:
            return HttpResponse.error(503, f"This node already carries {self.max_calls} calls")
        endpoint = MediaEndpoint(self.turn)
        self._pending_calls += 1
        try:
            sdp = await endpoint.answer(creq.sdp)
        except MediaError as exc:
            await endpoint.close()
            return HttpResponse.error(exc.status, str(exc))
        except Exception as exc:
            await endpoint.close()
            log.exception("nodesim: media setup failed")
            return HttpResponse.error(500, f"Media setup failed: {exc}")
        finally:
            self._pending_calls -= 1
        call_uuid = self.state.add_call(creq.participant_uuid)
        if call_uuid is None:  # the participant left while the answer was being made
            await endpoint.close()
            return HttpResponse.from_json(
                JsonResponse(403, {"status": "success", "result": "Invalid token"})
            )
        self.media[call_uuid] = endpoint
        self._watch(call_uuid, endpoint)
        body: dict[str, Any] = {"status": "success", "result": {"call_uuid": call_uuid, "sdp": sdp}}
        return HttpResponse.from_json(JsonResponse(200, body))

    def _watch(self, call_uuid: str, endpoint: MediaEndpoint) -> None:
        @endpoint.pc.on("connectionstatechange")
        def _changed() -> None:
            if endpoint.pc.connectionState in ("failed", "closed"):
                self.state.end_call(call_uuid)
                self._reap_calls()
