"""Active health checks (SPEC §2): the one loop the proxy workers and the status page run.

`check_node` is one `GET /api/client/v2/status`; `HealthChecker.run` checks every node at
once each `proxy.health_interval` seconds and feeds the results to a sans-I/O
`health.HealthMonitor`, handing each state change to `on_transition`. A proxy worker runs one
for its balancer (proxy/core.py); the management listener runs one of its own when the
proxy's are out of reach (admin/snapshot.py).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from confedge.config import NodeAddress, ProxyConfig
from confedge.proxy.health import HealthMonitor, Transition

__all__ = ["STATUS_PATH", "HealthChecker", "check_node"]

STATUS_PATH = "/api/client/v2/status"


class HealthChecker:
    """Checks `nodes` forever (cancel the task running `run` to stop)."""

    def __init__(
        self,
        nodes: list[NodeAddress],
        monitor: HealthMonitor,
        ctx: ssl.SSLContext | None,
        proxy: ProxyConfig,
        on_transition: Callable[[Transition | None], None],
        *,
        indices: range | None = None,
        interval: float | None = None,
        timeout: float | None = None,
    ) -> None:
        self.nodes = nodes
        self.monitor = monitor
        self.ctx = ctx
        # One checker per node pool (proxy/pools.py): its slice of `nodes` and its own settings.
        self.indices = range(len(nodes)) if indices is None else indices
        self.timeout = proxy.health_timeout if timeout is None else timeout
        self.interval = proxy.health_interval if interval is None else interval
        self.on_transition = on_transition

    async def run(self) -> None:
        while True:
            await asyncio.gather(*(self._check(i) for i in self.indices))
            await asyncio.sleep(self.interval)

    async def _check(self, i: int) -> None:
        result, detail = await check_node(self.nodes[i], self.ctx, self.timeout)
        now = asyncio.get_running_loop().time()
        self.on_transition(self.monitor.check_result(i, result, now, detail))  # type: ignore[arg-type]


async def check_node(
    node: NodeAddress, ctx: ssl.SSLContext | None, timeout: float
) -> tuple[str, str]:
    """One active health check: GET /api/client/v2/status -> ("ok"|"maintenance"|"fail", detail)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                node.host, node.port, ssl=ctx if node.scheme == "https" else None
            )
            writer.write(
                f"GET {STATUS_PATH} HTTP/1.1\r\nHost: {node.netloc}\r\n"
                "User-Agent: confedge-health\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
    except TimeoutError:
        return "fail", f"no answer within {timeout:g} s"
    except ValueError:
        # StreamReader's line limit (64 KiB) without a line end: this escaped, and the
        # checker's task ended, so that no node of its pool was ever checked again.
        return "fail", "not an HTTP answer (no line end in the first 64 KiB)"
    except (OSError, ssl.SSLError) as exc:
        return "fail", exc.strerror or str(exc) or type(exc).__name__
    finally:
        if writer is not None:
            writer.transport.abort()
    parts = line.split()
    # RFC 9112 §4: the status code is three digits (and int() of thousands would raise,
    # ending the checker's task as a line without an end once did)
    code = parts[1] if len(parts) >= 2 else b""
    if not parts or not parts[0].startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        return "fail", "not an HTTP answer"
    status = int(code)
    if status == 200:
        return "ok", ""
    if status == 503:
        return "maintenance", ""
    return "fail", f"status {status}"
