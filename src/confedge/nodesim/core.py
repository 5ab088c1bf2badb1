"""Sans-I/O state of the simulated conferencing node: conferences, tokens, participants, events.

Theory of operation
-------------------
The simulated node answers the subset of the Pexip Infinity client REST API v2 that SPEC §7
lists. Everything that decides *what* to answer lives here, as plain objects that take the
current time (``now``, seconds on any monotonic scale) and return values; nothing here touches
a socket, a clock or the event loop. The HTTP adapter (``server.py``) parses requests, calls
:meth:`NodeState.handle`, and writes what comes back; the media adapter (``media.py``) answers
SDP offers. Tests drive this module directly in simulated time, so token expiry is tested
without sleeping (DESIGN "Time is injected").

Objects:

* :class:`Conference` - an alias with an optional host PIN and guest PIN (Pexip semantics: a
  guest PIN only exists beside a host PIN; with a host PIN and no guest PIN, guests join with
  the PIN ``none``).
* Tokens - opaque random strings valid for :data:`TOKEN_TTL` seconds (``expires`` is the
  *string* "120", as the reference sends it). ``refresh_token`` swaps a live token for a new
  one and invalidates the old one at once; an expired token cannot be refreshed.
* Participants - one per successful ``request_token``; removed by ``release_token``,
  ``participants/<uuid>/disconnect``, or when their token expires (:meth:`NodeState.sweep`).
* Subscriptions - one per open ``/events`` stream: a queue of :class:`SseEvent` that the
  adapter drains. A new subscription starts with the sync bracket (``participant_sync_begin``,
  one ``participant_create`` per participant, ``participant_sync_end``); later joins, changes and
  departures arrive as live ``participant_create``/``participant_update``/``participant_delete``.
* Calls - created by the adapter once the media endpoint has answered (:meth:`add_call`); the
  core only tracks which call belongs to which participant, so that removing a participant
  tells the adapter which media endpoints to close (:attr:`NodeState.closed_calls`).
"""

from __future__ import annotations

import hmac
import json
import secrets
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

__all__ = [
    "TOKEN_TTL",
    "CallRequest",
    "Conference",
    "JsonResponse",
    "NodeState",
    "Participant",
    "Request",
    "SseEvent",
    "StreamRequest",
    "Subscription",
    "TurnInfo",
]

TOKEN_TTL = 120
"""Token lifetime in seconds; the reference answers ``"expires": "120"``."""

API_PREFIX = "/api/client/v2/"
MAX_DISPLAY_NAME = 256
MAX_SDP = 64 * 1024
MAX_PENDING_EVENTS = 1000

VERSION = {"version_id": "36", "pseudo_version": "confedge-nodesim"}


@dataclass(frozen=True)
class Conference:
    """A virtual meeting room.

    ``host_pin`` None = no PIN at all (everyone joins as host, as on the reference).
    ``guest_pin`` is only allowed beside a host PIN; with a host PIN and no guest PIN, guests
    may join by sending the PIN ``none`` (the reference's "allow guests" without a guest PIN).
    """

    alias: str
    host_pin: str | None = None
    guest_pin: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.alias or any(c in self.alias for c in "/?#\\ \t\r\n"):
            raise ValueError(
                f"conference alias {self.alias!r} is not valid "
                "(non-empty, without '/', '?', '#', '\\' or whitespace)"
            )
        for label, pin in (("host PIN", self.host_pin), ("guest PIN", self.guest_pin)):
            if pin is not None and (not pin or pin.lower() == "none" or not pin.isprintable()):
                raise ValueError(
                    f"conference {self.alias!r}: {label} {pin!r} is not valid "
                    '(a non-empty printable string other than "none")'
                )
        if self.guest_pin is not None and self.host_pin is None:
            raise ValueError(
                f"conference {self.alias!r}: a guest PIN needs a host PIN "
                "(as on the reference, guests cannot be protected while hosts are not)"
            )
        if self.guest_pin is not None and self.guest_pin == self.host_pin:
            raise ValueError(f"conference {self.alias!r}: host and guest PIN must differ")

    @property
    def display_name(self) -> str:
        return self.name or self.alias

    @classmethod
    def parse(cls, text: str) -> Conference:
        """Parse the CLI form ``alias[:hostpin[:guestpin]]``."""
        parts = text.split(":")
        if len(parts) > 3:
            raise ValueError(
                f"{text!r} is not a conference (expected alias[:hostpin[:guestpin]], "
                'e.g. "meet" or "meet:1234" or "meet:1234:5678")'
            )
        alias = parts[0]
        host = parts[1] if len(parts) > 1 and parts[1] else None
        guest = parts[2] if len(parts) > 2 and parts[2] else None
        return cls(alias=alias, host_pin=host, guest_pin=guest)


@dataclass(frozen=True)
class TurnInfo:
    """The TURN server a node uses in restricted mode, with its long-term credential."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"turn:{host}:{self.port}?transport=udp"


@dataclass(frozen=True)
class Request:
    """One parsed HTTP request, as the adapter hands it to the core."""

    method: str
    path: str  # raw path, without the query string
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


@dataclass(frozen=True)
class JsonResponse:
    status: int
    body: Any

    def encode(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class StreamRequest:
    """The request opened an ``/events`` stream: the adapter drains ``subscription``."""

    subscription: Subscription


@dataclass(frozen=True)
class CallRequest:
    """A valid ``calls`` request: the adapter must answer ``sdp`` with a media endpoint, then
    call :meth:`NodeState.add_call` (or answer an error itself)."""

    alias: str
    participant_uuid: str
    sdp: str


@dataclass(frozen=True)
class SseEvent:
    name: str
    data: Any  # JSON-serialisable, or None for an empty data line

    def encode(self) -> bytes:
        """The wire form (WHATWG HTML "Server-sent events", 9.2.6 interpreting an event stream)."""
        payload = "" if self.data is None else json.dumps(self.data, separators=(",", ":"))
        return f"event: {self.name}\ndata: {payload}\n\n".encode()


class Subscription:
    """One open event stream, bound to the participant whose token opened it."""

    def __init__(self, alias: str, participant_uuid: str) -> None:
        self.alias = alias
        self.participant_uuid = participant_uuid
        self.events: deque[SseEvent] = deque()
        self.closed = False
        self.on_event: Callable[[], None] | None = None  # adapter's wake-up hook

    def push(self, event: SseEvent) -> None:
        if self.closed:
            return
        if len(self.events) >= MAX_PENDING_EVENTS:
            # The client stopped reading. Rather than buffer without bound, end the stream: a
            # client that reconnects gets a fresh sync bracket, which is what it is for.
            self.close()
            return
        self.events.append(event)
        if self.on_event is not None:
            self.on_event()

    def close(self) -> None:
        self.closed = True
        if self.on_event is not None:
            self.on_event()


@dataclass
class Participant:
    uuid: str
    alias: str
    display_name: str
    role: str  # "HOST" or "GUEST" (request_token form)
    start_time: float
    vendor: str = ""
    calls: set[str] = field(default_factory=set)

    def to_json(self, wall_start: int) -> dict[str, Any]:
        """The participant object of ``participants`` and ``participant_*`` events."""
        in_call = bool(self.calls)
        return {
            "uuid": self.uuid,
            "display_name": self.display_name,
            "overlay_text": self.display_name,
            "role": "chair" if self.role == "HOST" else "guest",
            "service_type": "conference",
            "protocol": "webrtc" if in_call else "api",
            "call_direction": "in",
            "local_alias": self.alias,
            "uri": "",
            "vendor": self.vendor,
            "start_time": wall_start,
            "has_media": in_call,
            "is_audio_only_call": "NO",
            "is_video_call": "YES" if in_call else "NO",
            "is_muted": "NO",
            "is_video_muted": False,
            "is_presenting": "NO",
            "presentation_supported": "NO",
            "rx_presentation_policy": "ALLOW",
            "disconnect_supported": "YES",
            "mute_supported": "YES",
            "transfer_supported": "YES",
            "encryption": "On",
            "is_external": False,
            "buzz_time": 0,
            "spotlight": 0,
        }


@dataclass
class _Token:
    participant_uuid: str
    alias: str
    expires_at: float


def _ok(result: Any, status: int = 200) -> JsonResponse:
    return JsonResponse(status, {"status": "success", "result": result})


def _json_object(req: Request) -> dict[str, Any] | JsonResponse:
    """The request body as a JSON object (empty = {}), or the 400 answer saying what is wrong."""
    try:
        body = json.loads(req.body or b"{}")
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." 100k deep
        return _fail(400, "Request body is not valid JSON")
    if not isinstance(body, dict):
        return _fail(400, "Request body must be a JSON object")
    return body


def _fail(status: int, reason: str) -> JsonResponse:
    return JsonResponse(status, {"status": "failure", "result": reason})


INVALID_TOKEN = _ok("Invalid token", 403)
INVALID_PIN = _ok("Invalid PIN", 403)
NOT_FOUND = _ok("Neither conference nor gateway found", 404)


class NodeState:
    """The node's API state machine. Every public method takes ``now``."""

    def __init__(
        self,
        conferences: Iterable[Conference],
        turn: TurnInfo | None = None,
        node_name: str = "nodesim",
        *,
        token_ttl: int = TOKEN_TTL,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.conferences: dict[str, Conference] = {}
        for conf in conferences:
            key = conf.alias.lower()
            if key in self.conferences:
                raise ValueError(f"conference alias {conf.alias!r} is listed twice")
            self.conferences[key] = conf
        self.turn = turn
        self.node_name = node_name
        self.token_ttl = token_ttl
        self.maintenance = False
        self._wall = wall_clock
        self._tokens: dict[str, _Token] = {}
        self.participants: dict[str, Participant] = {}
        self._subs: list[Subscription] = []
        self.calls: dict[str, str] = {}  # call uuid -> participant uuid
        self.closed_calls: list[str] = []  # calls the adapter must tear down (drained by it)

    # ---------------------------------------------------------------- helpers

    def _wall_start(self, p: Participant) -> int:
        return int(self._wall()) if self._wall is not None else int(p.start_time)

    def _pjson(self, p: Participant) -> dict[str, Any]:
        return p.to_json(self._wall_start(p))

    def _broadcast(self, alias: str, event: SseEvent) -> None:
        for sub in self._subs:
            if sub.alias == alias:
                sub.push(event)

    def _new_token(self, participant_uuid: str, alias: str, now: float) -> str:
        token = secrets.token_urlsafe(48)
        self._tokens[token] = _Token(participant_uuid, alias, now + self.token_ttl)
        return token

    def _check_token(self, req: Request, alias: str, now: float) -> _Token | None:
        token = req.headers.get("token") or req.query.get("token")
        if not token:
            return None
        rec = self._tokens.get(token)
        if rec is None or rec.alias != alias or now >= rec.expires_at:
            return None
        if rec.participant_uuid not in self.participants:
            return None
        return rec

    def token_expiry(self, token: str) -> float | None:
        rec = self._tokens.get(token)
        return None if rec is None else rec.expires_at

    # ---------------------------------------------------------------- lifecycle

    def remove_participant(self, participant_uuid: str, reason: str) -> None:
        """Drop a participant: its tokens, calls and streams go; everyone else is told."""
        p = self.participants.pop(participant_uuid, None)
        if p is None:
            return
        for tok in [t for t, r in self._tokens.items() if r.participant_uuid == participant_uuid]:
            del self._tokens[tok]
        for call in sorted(p.calls):
            self.calls.pop(call, None)
            self.closed_calls.append(call)
        p.calls.clear()
        for sub in [s for s in self._subs if s.participant_uuid == participant_uuid]:
            sub.push(SseEvent("disconnect", {"reason": reason}))
            sub.close()
            self._subs.remove(sub)
        self._broadcast(p.alias, SseEvent("participant_delete", {"uuid": participant_uuid}))

    def sweep(self, now: float) -> None:
        """Expire tokens; a participant whose every token expired leaves the conference."""
        expired = [t for t, r in self._tokens.items() if now >= r.expires_at]
        for tok in expired:
            rec = self._tokens.pop(tok)
            if not any(r.participant_uuid == rec.participant_uuid for r in self._tokens.values()):
                self.remove_participant(rec.participant_uuid, "Token expired")

    def unsubscribe(self, sub: Subscription) -> None:
        sub.closed = True
        if sub in self._subs:
            self._subs.remove(sub)

    def add_call(self, participant_uuid: str) -> str | None:
        """Record a call answered by the adapter; None if the participant left meanwhile."""
        p = self.participants.get(participant_uuid)
        if p is None:
            return None
        call_uuid = str(uuid.uuid4())
        self.calls[call_uuid] = participant_uuid
        p.calls.add(call_uuid)
        if len(p.calls) == 1:
            self._broadcast(p.alias, SseEvent("participant_update", self._pjson(p)))
        return call_uuid

    def end_call(self, call_uuid: str) -> None:
        participant_uuid = self.calls.pop(call_uuid, None)
        if participant_uuid is None:
            return
        self.closed_calls.append(call_uuid)
        p = self.participants.get(participant_uuid)
        if p is not None:
            p.calls.discard(call_uuid)
            if not p.calls:
                self._broadcast(p.alias, SseEvent("participant_update", self._pjson(p)))

    def set_maintenance(self, on: bool) -> None:
        self.maintenance = on

    # ---------------------------------------------------------------- the API

    def handle(self, req: Request, now: float) -> JsonResponse | StreamRequest | CallRequest:
        """Route one request of the client REST API v2 (SPEC §7)."""
        path = req.path
        if not path.startswith(API_PREFIX):
            return _fail(404, "Not found")
        parts = [unquote(p) for p in path[len(API_PREFIX) :].split("/")]
        if parts == ["status"]:
            if req.method not in ("GET", "HEAD"):
                return _fail(405, "Method not allowed")
            if self.maintenance:
                return JsonResponse(503, {"status": "failed", "result": "Maintenance mode"})
            return _ok("OK")
        if len(parts) < 3 or parts[0] != "conferences" or not parts[1]:
            return _fail(404, "Not found")
        alias, rest = parts[1], parts[2:]
        conf = self.conferences.get(alias.lower())
        new_call = len(rest) == 3 and rest[0] == "participants" and rest[2] == "calls"
        if self.maintenance and (rest == ["request_token"] or new_call):
            # A node in maintenance refuses new work (joins and new calls) while the people
            # already on it keep their token, events and call, as a real node does; the proxy
            # stops sending it new joins.
            return JsonResponse(503, {"status": "failed", "result": "Maintenance mode"})
        if conf is None:
            return NOT_FOUND
        key = conf.alias
        if rest == ["request_token"]:
            if req.method != "POST":
                return _fail(405, "Method not allowed")
            return self._request_token(conf, req, now)
        tok = self._check_token(req, key, now)
        route = rest[0]
        method_needed = "GET" if route in ("events", "conference_status") else "POST"
        if route == "participants" and len(rest) == 1:
            method_needed = "GET"
        if req.method != method_needed:
            return _fail(405, "Method not allowed")
        if tok is None:
            return INVALID_TOKEN
        me = self.participants[tok.participant_uuid]
        if rest == ["refresh_token"]:
            return self._refresh(req, tok, now)
        if rest == ["release_token"]:
            self.remove_participant(me.uuid, "Token released")
            return _ok(True)
        if rest == ["conference_status"]:
            return _ok(self._conference_status(conf))
        if rest == ["participants"]:
            plist = [self._pjson(p) for p in self.participants.values() if p.alias == key]
            return _ok(plist)
        if rest == ["events"]:
            return StreamRequest(self._subscribe(key, me.uuid))
        if route == "participants" and len(rest) >= 3:
            return self._participant_action(conf, me, rest[1], rest[2:], req)
        return _fail(404, "Not found")

    def _request_token(self, conf: Conference, req: Request, now: float) -> JsonResponse:
        body = _json_object(req)
        if isinstance(body, JsonResponse):
            return body
        name = body.get("display_name")
        if not isinstance(name, str) or not name.strip():
            return _fail(400, "display_name is required (a non-empty string)")
        name = name.strip()
        if len(name) > MAX_DISPLAY_NAME or not name.isprintable():
            return _fail(
                400, f"display_name must be printable and at most {MAX_DISPLAY_NAME} chars"
            )
        pin = req.headers.get("pin")
        if pin is None:
            body_pin = body.get("pin")
            pin = body_pin if isinstance(body_pin, str) else None
        role = self._role_for_pin(conf, pin)
        if isinstance(role, JsonResponse):
            return role
        participant_uuid = str(uuid.uuid4())
        p = Participant(
            uuid=participant_uuid,
            alias=conf.alias,
            display_name=name,
            role=role,
            start_time=now,
            vendor=req.headers.get("user-agent", "")[:200],
        )
        self.participants[participant_uuid] = p
        token = self._new_token(participant_uuid, conf.alias, now)
        self._broadcast(conf.alias, SseEvent("participant_create", self._pjson(p)))
        result: dict[str, Any] = {
            "token": token,
            "expires": str(self.token_ttl),
            "participant_uuid": participant_uuid,
            "display_name": name,
            "role": role,
            "conference_name": conf.display_name,
            "service_type": "conference",
            "current_service_type": "conference",
            "call_type": "video",
            "version": dict(VERSION),
            "chat_enabled": False,
            "fecc_enabled": False,
            "rtmp_enabled": False,
            "analytics_enabled": False,
            "guests_can_present": False,
            "direct_media": False,
            "stun": [],
            "turn": [],
        }
        if self.turn is not None:
            host = f"[{self.turn.host}]" if ":" in self.turn.host else self.turn.host
            result["stun"] = [{"url": f"stun:{host}:{self.turn.port}"}]
        return _ok(result)

    def _role_for_pin(self, conf: Conference, pin: str | None) -> str | JsonResponse:
        """Pexip PIN rules; comparisons are constant-time (the PIN is what the guard protects)."""
        if conf.host_pin is None:
            return "HOST"
        if pin is None or pin == "":
            return _ok(
                {"pin": "required", "guest_pin": "required" if conf.guest_pin else "none"}, 403
            )
        if hmac.compare_digest(pin.encode(), conf.host_pin.encode()):
            return "HOST"
        if conf.guest_pin is not None:
            if hmac.compare_digest(pin.encode(), conf.guest_pin.encode()):
                return "GUEST"
        elif pin.lower() == "none":
            return "GUEST"
        return INVALID_PIN

    def _refresh(self, req: Request, tok: _Token, now: float) -> JsonResponse:
        old = req.headers.get("token") or req.query.get("token") or ""
        self._tokens.pop(old, None)
        token = self._new_token(tok.participant_uuid, tok.alias, now)
        return _ok({"token": token, "expires": str(self.token_ttl)})

    def _conference_status(self, conf: Conference) -> dict[str, Any]:
        return {
            "name": conf.display_name,
            "locked": False,
            "started": True,
            "guests_muted": False,
            "all_muted": False,
            "presentation_allowed": True,
            "guests_can_present": False,
            "guests_can_unmute": True,
            "chat_enabled": False,
            "direct_media": False,
            "live_captions_available": False,
            "recording": False,
            "streaming": False,
            "transcribing": False,
            "breakout_rooms": False,
        }

    def _subscribe(self, alias: str, participant_uuid: str) -> Subscription:
        sub = Subscription(alias, participant_uuid)
        sub.push(SseEvent("participant_sync_begin", None))
        for p in self.participants.values():
            if p.alias == alias:
                sub.push(SseEvent("participant_create", self._pjson(p)))
        sub.push(SseEvent("participant_sync_end", None))
        self._subs.append(sub)
        return sub

    def _participant_action(
        self, conf: Conference, me: Participant, target: str, action: list[str], req: Request
    ) -> JsonResponse | CallRequest:
        other = self.participants.get(target)
        if other is None or other.alias != conf.alias:
            return _fail(404, "Participant not found")
        if other.uuid != me.uuid and (me.role != "HOST" or action != ["disconnect"]):
            # Guests act only on themselves; hosts may also disconnect others (reference).
            return _fail(403, "Not permitted")
        if action == ["disconnect"]:
            reason = "Disconnected by host" if other is not me else "Participant disconnected"
            self.remove_participant(other.uuid, reason)
            return _ok(True)
        if action == ["calls"]:
            body = _json_object(req)
            if isinstance(body, JsonResponse):
                return body
            if body.get("call_type", "WEBRTC") != "WEBRTC":
                return _fail(400, "Only call_type WEBRTC is supported")
            sdp = body.get("sdp")
            if not isinstance(sdp, str) or not sdp.startswith("v=0"):
                return _fail(400, "sdp is required (an SDP offer starting with v=0)")
            if len(sdp) > MAX_SDP:
                return _fail(400, f"sdp is larger than {MAX_SDP} bytes")
            if not any(line.startswith(("m=audio ", "m=video ")) for line in sdp.splitlines()):
                return _fail(400, "sdp has no audio or video media section (m=audio / m=video)")
            return CallRequest(conf.alias, me.uuid, sdp)
        if len(action) == 3 and action[0] == "calls" and action[2] in ("ack", "disconnect"):
            call = action[1]
            if self.calls.get(call) != me.uuid:
                return _fail(404, "Call not found")
            if action[2] == "ack":
                return _ok(None)
            self.end_call(call)
            return _ok(True)
        return _fail(404, "Not found")
