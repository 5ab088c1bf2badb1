"""The node's WebRTC endpoint: answers a browser's offer and echoes its audio and video back.

A real conferencing node in restricted mode takes its media through the edge's TURN server: it
allocates a relayed address there with the long-term credential (RFC 8656 section 7, Allocate)
and uses only that address, so the browser (on the Internet) only ever talks to the edge.

Two things make that hold here:

* the peer connection uses ``iceTransportPolicy = relay`` (aiortc >= 1.10 passes it to aioice):
  the node gathers and checks *only* from its relayed address. Filtering the SDP alone is not
  enough: with host candidates still in the ICE agent, the node's connectivity checks leave from
  its host address, the browser learns that address as peer-reflexive (RFC 8445 section 7.3.1.3)
  and may nominate it, bypassing the relay (the integration test saw exactly that);
* the answer SDP carries only relay candidates (RFC 8839 section 5.1, ``a=candidate``), so the
  browser does not even try another address.

The browser then can only pick a pair whose remote candidate is the relay address, which is what
the end-to-end test checks with ``getStats()``.

aiortc is an optional dependency (the ``demo`` extra); importing this module without it raises
an ImportError naming the extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .core import TurnInfo

try:
    from aiortc import (
        RTCConfiguration,
        RTCIceServer,
        RTCIceTransportPolicy,
        RTCPeerConnection,
        RTCSessionDescription,
    )
    from aiortc.contrib.media import MediaRelay
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the simulated node's media endpoint needs aiortc: pip install 'confedge[demo]'"
    ) from exc

__all__ = ["MediaEndpoint", "MediaError", "relay_only_sdp"]

log = logging.getLogger("confedge.nodesim.media")


class MediaError(Exception):
    """The offer could not be answered; ``status`` is the HTTP status the API should use."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def relay_only_sdp(sdp: str) -> tuple[str, int]:
    """Drop every non-relay ``a=candidate`` line; point ``c=`` lines at the relay address.

    Returns the new SDP and the number of relay candidates kept. The ``c=`` rewrite keeps the
    SDP self-consistent: RFC 8839 section 4.2.1.1 has the default destination (``c=``/``m=``
    port) be one of the candidates, and aiortc puts its host address there.
    """
    lines = sdp.splitlines()
    kept: list[str] = []
    relay_addr: tuple[str, str] | None = None
    count = 0
    for line in lines:
        if line.startswith("a=candidate:"):
            fields = line.split()
            try:
                typ = fields[fields.index("typ") + 1]
            except (ValueError, IndexError):
                continue
            if typ != "relay":
                continue
            count += 1
            if relay_addr is None and len(fields) > 5:
                relay_addr = (fields[4], fields[5])
        kept.append(line)
    if relay_addr is not None:
        ip, port = relay_addr
        family = "IP6" if ":" in ip else "IP4"
        out: list[str] = []
        for line in kept:
            if line.startswith("c=IN "):
                line = f"c=IN {family} {ip}"
            elif line.startswith("m=") and " " in line:
                head, _, tail = line.partition(" ")
                _, _, rest = tail.partition(" ")
                line = f"{head} {port} {rest}"
            out.append(line)
        kept = out
    return "\r\n".join(kept) + "\r\n", count


class MediaEndpoint:
    """One call's peer connection: answer an offer, echo the received tracks, close."""

    def __init__(self, turn: TurnInfo | None) -> None:
        self.turn = turn
        servers: list[Any] = []
        if turn is not None:
            servers.append(
                RTCIceServer(urls=turn.url, username=turn.username, credential=turn.password)
            )
        # An explicit (possibly empty) list: aiortc's default is a public Google STUN server,
        # and a test or demo must never reach out to the Internet.
        policy = RTCIceTransportPolicy.RELAY if turn is not None else RTCIceTransportPolicy.ALL
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers, iceTransportPolicy=policy))
        self._relay = MediaRelay()
        self.tracks_echoed: list[str] = []

        @self.pc.on("track")
        def _on_track(track: Any) -> None:
            # Fired inside setRemoteDescription: adding the sender now puts it on the same
            # transceiver, so the answer is sendrecv and the browser gets its own media back.
            self.pc.addTrack(self._relay.subscribe(track))
            self.tracks_echoed.append(str(track.kind))

    @property
    def connection_state(self) -> str:
        return str(self.pc.connectionState)

    async def answer(self, offer_sdp: str, timeout: float = 20.0) -> str:
        """Answer the offer; with TURN configured, the answer carries only relay candidates."""
        try:
            await asyncio.wait_for(
                self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer")),
                timeout,
            )
        except (ValueError, AssertionError, KeyError, IndexError) as exc:
            raise MediaError(400, f"the SDP offer was not accepted: {exc}") from None
        try:
            answer = await self.pc.createAnswer()
            # setLocalDescription waits for ICE gathering (aiortc does not trickle), so the
            # SDP it leaves in localDescription holds every gathered candidate.
            await asyncio.wait_for(self.pc.setLocalDescription(answer), timeout)
        except TimeoutError:
            raise MediaError(504, "ICE gathering did not finish in time") from None
        except (ValueError, AssertionError) as exc:
            raise MediaError(400, f"no answer is possible for this offer: {exc}") from None
        sdp = str(self.pc.localDescription.sdp)
        if self.turn is None:
            return sdp
        sdp, relays = relay_only_sdp(sdp)
        if relays == 0:
            raise MediaError(
                502,
                f"no relayed address could be allocated on the TURN server "
                f"{self.turn.host}:{self.turn.port} (is it running, and are the node's address "
                f"and credential accepted?)",
            )
        return sdp

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pc.close()
