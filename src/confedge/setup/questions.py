"""The wizard's questions, as data: what each asks, when it applies, its default, its validator.

Every question but the first is named by the configuration key it sets (`server.domain`), so an
answers file, `--set` and the wizard speak one language, and the validator of a key is the same
whichever way the answer came. The first question ("interfaces": one NIC or two) has no key of
its own: its answer is whether `server.external_address` is set.

Order and content follow the reference appliance's wizard where it concerns this service (SPEC
§6): interfaces, addresses, names, signalling nodes, balancing, CSP, TURN and its mode and
credentials, media nodes, TURN over TLS on 443, management networks, the guard. A question that
does not apply to the answers so far is skipped (no TURN: no TURN questions), so the
ordering is also the dependency order: a question's `applies` only looks at earlier answers.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confedge.config import Config, NodeAddress
from confedge.stun.saslprep import saslprep

from .host import HostAddress
from .values import AnswerError, check_key, convert, fmt

__all__ = [
    "QUESTIONS",
    "Question",
    "State",
    "by_key",
    "generate_secret",
    "host_defaults",
    "initial_state",
]


def generate_secret() -> str:
    """A fresh TURN password or REST secret: 32 random bytes, URL-safe text (43 characters)."""
    return secrets.token_urlsafe(32)


@dataclass
class State:
    """The answers so far: every key's effective value (the file's, else the model default)."""

    values: dict[str, Any]
    host: list[HostAddress] = field(default_factory=list)
    generated: set[str] = field(default_factory=set)  # keys whose value was generated just now
    interactive: bool = True  # the wizard (an empty external address is then a mistake)

    def __getitem__(self, key: str) -> Any:
        return self.values.get(key)


Validator = Callable[[Any, State], Any]


@dataclass(frozen=True)
class Question:
    key: str
    title: str  # the summary screen's label
    prompt: str
    help: str = ""
    check: Validator | None = None  # None: the key's type and the model's rule for it
    applies: Callable[[State], bool] = lambda s: True
    choices: Callable[[State], list[tuple[str, str]]] | None = None  # (value, label)
    secret: bool = False  # masked on the summary screen
    generate: bool = False  # blank with no current value: generate one

    def validate(self, value: Any, state: State) -> Any:
        return (self.check or _typed(self.key))(value, state)

    def default(self, state: State) -> Any:
        if self.key == "interfaces":
            return 2 if state["server.external_address"] else 1
        if self.key == "server.external_address" and not state[self.key]:
            internal = state["server.internal_address"]
            others = [h.address for h in state.host if h.address != internal]
            return others[0] if others else None
        if self.key == "turn.media_nodes" and not state[self.key]:
            return _node_hosts(state)  # the reference defaults media nodes to the signalling ones
        return state[self.key]


# --- validators: one per answer, each built from the model's own rules plus what the wizard
# knows about the answers so far.


def _typed(key: str, *extra: Callable[[Any, State], None]) -> Validator:
    def validate(value: Any, state: State) -> Any:
        v = check_key(key, convert(key, value))
        for check in extra:
            check(v, state)
        return v

    return validate


def _interfaces(value: Any, state: State) -> int:
    text = str(value).strip().lower()
    n = {"1": 1, "one": 1, "2": 2, "two": 2}.get(text)
    if n is None:
        raise AnswerError("interfaces", f"{fmt(value)} is not 1 or 2 (network interfaces)")
    return n


def _not_unspecified(key: str) -> Callable[[Any, State], None]:
    def check(v: Any, state: State) -> None:
        if v is not None and ipaddress.ip_address(v).is_unspecified:
            raise AnswerError(
                key, f"{fmt(v)} is not one address; give the address this host has on that side"
            )

    return check


def _external_differs(v: Any, state: State) -> None:
    if v is None and state.interactive:
        raise AnswerError(
            "server.external_address",
            '"" is empty; give the address that faces the Internet (or answer 1 interface)',
        )
    if v == state["server.internal_address"]:
        raise AnswerError(
            "server.external_address",
            f"{fmt(v)} is the internal address too; give the other interface's address "
            "(or answer 1 interface)",
        )


def _one_label(v: Any, state: State) -> None:
    if "." in v:
        raise AnswerError(
            "server.hostname",
            f'{fmt(v)} has a dot; give the host name alone (e.g. "edge") and the rest as the '
            "domain",
        )


def _non_empty(key: str, what: str) -> Callable[[Any, State], None]:
    def check(v: Any, state: State) -> None:
        if not v:
            raise AnswerError(key, f"[] is empty; list at least one {what}")

    return check


def _username(value: Any, state: State) -> str:
    v = check_key("turn.username", convert("turn.username", value))
    if not v:
        raise AnswerError("turn.username", '"" is empty; restricted TURN needs a username')
    try:
        saslprep(v)
    except ValueError as exc:
        raise AnswerError("turn.username", f"{fmt(v)} is not usable for TURN ({exc})") from None
    return str(v)


def _password(value: Any, state: State) -> str:
    v = convert("turn.password", value)
    if v == "generate":
        state.generated.add("turn.password")
        return generate_secret()
    if not v:
        raise AnswerError(
            "turn.password", '"" is empty; type a password, or "generate" for a new one'
        )
    return str(check_key("turn.password", v))


def _secrets(value: Any, state: State) -> list[str]:
    v = convert("turn.secrets", value)
    if v in (["generate"], ["rotate"]):
        state.generated.add("turn.secrets")
        kept = list(state["turn.secrets"] or []) if v == ["rotate"] else []
        return [generate_secret(), *kept]
    if not v:
        raise AnswerError("turn.secrets", '[] is empty; type a secret, or "generate" for a new one')
    return list(check_key("turn.secrets", v))


def _positive(key: str) -> Callable[[Any, State], None]:
    def check(v: Any, state: State) -> None:
        if v <= 0:
            raise AnswerError(key, f"{fmt(v)} is not above 0")

    return check


# --- when questions apply


def _proxy(s: State) -> bool:
    return bool(s["proxy.enabled"])


def _turn(s: State) -> bool:
    return bool(s["turn.enabled"])


def _restricted(s: State) -> bool:
    return _turn(s) and s["turn.mode"] == "restricted"


def _permissive(s: State) -> bool:
    return _turn(s) and s["turn.mode"] == "permissive"


def _guard(s: State) -> bool:
    return bool(s["guard.enabled"])


def _address_choices(s: State) -> list[tuple[str, str]]:
    return [(h.address, h.label) for h in s.host]


def _node_hosts(s: State) -> list[str]:
    """The signalling nodes' hosts: what media_nodes defaults to (the reference does the same)."""
    hosts = []
    for n in s["proxy.nodes"] or []:
        try:
            host = NodeAddress.parse(n).host
            ipaddress.ip_address(host)
        except ValueError:
            continue
        hosts.append(host)
    return hosts


QUESTIONS: tuple[Question, ...] = (
    Question(
        "interfaces",
        "Network interfaces",
        "Network interfaces (1 or 2)",
        "One interface: one address serves everything. Two: an internal address (conferencing "
        "nodes, management) and an external one (the Internet).",
        _interfaces,
    ),
    Question(
        "server.internal_address",
        "Internal address",
        "Internal address",
        "Faces the conferencing nodes and the management networks; TURN listens here.",
        _typed("server.internal_address", _not_unspecified("server.internal_address")),
        choices=_address_choices,
    ),
    Question(
        "server.external_address",
        "External address",
        "External address",
        "Faces the Internet: HTTPS listens here too, and TURN relay addresses are on it.",
        _typed(
            "server.external_address",
            _external_differs,
            _not_unspecified("server.external_address"),
        ),
        applies=lambda s: s["interfaces"] == 2,
        choices=_address_choices,
    ),
    Question(
        "server.hostname",
        "Host name",
        "Host name",
        "With the domain it makes the name clients use (and the certificate's name).",
        _typed("server.hostname", _one_label),
    ),
    Question(
        "server.domain",
        "Domain",
        "Domain",
        "Also the TURN realm.",
    ),
    Question(
        "proxy.enabled",
        "HTTPS reverse proxy",
        "Proxy HTTPS signalling to conferencing nodes? (yes/no)",
        "",
    ),
    Question(
        "proxy.nodes",
        "Conferencing nodes (signalling)",
        "Conferencing node addresses (comma-separated; host, host:port or http(s)://host:port)",
        "HTTPS on port 443 unless you give another port or http://.",
        _typed("proxy.nodes", _non_empty("proxy.nodes", "conferencing node")),
        applies=_proxy,
    ),
    Question(
        "proxy.balance",
        "Balancing",
        "Balancing (round-robin, ip-hash, least-conn)",
        "ip-hash keeps each client on one node (what the reference's nginx does).",
        applies=_proxy,
        choices=lambda s: [
            ("round-robin", "round-robin"),
            ("ip-hash", "ip-hash (client affinity)"),
            ("least-conn", "least-conn"),
        ],
    ),
    Question(
        "proxy.csp",
        "Content-Security-Policy",
        "Add a Content-Security-Policy when a node sends none? (yes/no)",
        "It admits the Office origins the Outlook scheduling add-in needs.",
        applies=_proxy,
    ),
    Question(
        "turn.enabled",
        "TURN server",
        "Enable the TURN server? (yes/no)",
        "Relays media for clients that cannot reach the conferencing nodes directly.",
    ),
    Question(
        "turn.mode",
        "TURN mode",
        "TURN mode (restricted or permissive)",
        "restricted: only the conferencing nodes may allocate (one username and password). "
        "permissive: browsers allocate with time-limited credentials from a shared secret "
        "(direct media); put the edge in a DMZ then.",
        applies=_turn,
        choices=lambda s: [("restricted", "restricted"), ("permissive", "permissive")],
    ),
    Question(
        "turn.username",
        "TURN username",
        "TURN username",
        "The long-term credential you also configure on the conferencing platform.",
        _username,
        applies=_restricted,
    ),
    Question(
        "turn.password",
        "TURN password",
        "TURN password",
        "Leave blank to keep the current one; with none, blank generates one (shown once).",
        _password,
        applies=_restricted,
        secret=True,
        generate=True,
    ),
    Question(
        "turn.secrets",
        "TURN REST secrets",
        "TURN shared secrets (comma-separated, first one current)",
        "Leave blank to keep the current ones; with none, blank generates one (shown once); "
        '"rotate" adds a new current secret and keeps the old ones.',
        _secrets,
        applies=_permissive,
        secret=True,
        generate=True,
    ),
    Question(
        "turn.media_nodes",
        "Media nodes (may use TURN)",
        "Media node addresses (comma-separated addresses or networks)",
        "Only these may allocate relays (restricted mode).",
        _typed("turn.media_nodes", _non_empty("turn.media_nodes", "media node address")),
        applies=_restricted,
    ),
    Question(
        "turn.tls_on_https",
        "TURN over TLS on 443",
        "Offer TURN over TLS on the HTTPS port too? (yes/no)",
        "For clients behind firewalls that only let HTTPS out (RFC 7443, ALPN stun.turn).",
        applies=lambda s: _turn(s) and _proxy(s),
    ),
    Question(
        "management.networks",
        "Management networks",
        "Management networks (comma-separated networks; none for local only)",
        "They may reach the status page, metrics and admin API on the internal address.",
    ),
    Question(
        "guard.enabled",
        "PIN guard",
        "Ban clients that guess conference PINs? (yes/no)",
        "confedge's fail2ban: wrong PINs from one address within findtime ban it for bantime.",
    ),
    Question(
        "guard.maxretry",
        "Guard: wrong PINs before a ban",
        "Wrong PINs before a ban (maxretry)",
        "",
        _typed("guard.maxretry", _positive("guard.maxretry")),
        applies=_guard,
    ),
    Question(
        "guard.findtime",
        "Guard: window (s)",
        "Counting window in seconds (findtime)",
        "",
        _typed("guard.findtime", _positive("guard.findtime")),
        applies=_guard,
    ),
    Question(
        "guard.bantime",
        "Guard: ban time (s)",
        "Ban time in seconds (bantime)",
        "",
        _typed("guard.bantime", _positive("guard.bantime")),
        applies=_guard,
    ),
)

_BY_KEY = {q.key: q for q in QUESTIONS}


def by_key(key: str) -> Question | None:
    return _BY_KEY.get(key)


def initial_state(doc_get: Callable[[str], Any], host: list[HostAddress]) -> State:
    """Every asked key's effective value: the file's, else a default fitted to this host."""
    defaults = Config()  # the defaults, unvalidated (proxy.nodes is empty)
    values: dict[str, Any] = {}
    for q in QUESTIONS[1:]:
        section, name = q.key.split(".")
        current = doc_get(q.key)
        if current is None:
            current = getattr(getattr(defaults, section), name)
            if isinstance(current, float) and current.is_integer():
                current = int(current)  # offered and written as 300, not 300.0
        values[q.key] = current
    values["interfaces"] = 2 if values["server.external_address"] else 1
    return State(values, host)


def host_defaults(state: State, doc_get: Callable[[str], Any], names: tuple[str, str]) -> None:
    """First run: defaults from the host instead of the model's loopback and localdomain."""
    if doc_get("server.internal_address") is None and state.host:
        # Private addresses face the nodes; a global one faces the Internet. Two interfaces
        # with IPv4 addresses suggest the two-NIC layout (the reference counts NICs the same).
        v4 = [h for h in state.host if ":" not in h.address and not h.address.startswith("127.")]
        private = [h for h in v4 if ipaddress.ip_address(h.address).is_private] or v4
        internal = private[0] if private else state.host[0]
        state.values["server.internal_address"] = internal.address
        others = [h for h in v4 if h.interface != internal.interface]
        if others and doc_get("server.external_address") is None:
            public = [h for h in others if ipaddress.ip_address(h.address).is_global] or others
            state.values["server.external_address"] = public[0].address
            state.values["interfaces"] = 2
    if doc_get("server.hostname") is None:
        state.values["server.hostname"] = names[0]
    if doc_get("server.domain") is None:
        state.values["server.domain"] = names[1]
