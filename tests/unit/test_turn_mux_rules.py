"""turn/multiplex.py: the demultiplexing rules of shared relay sockets (turn.relay_multiplex).

The same rules are mirrored in C (``_native.c``); tests/integration/test_turn_multiplex.py
drives both data planes through real sockets.
"""

from __future__ import annotations

import pytest

from confedge.config import ConfigError
from confedge.turn.multiplex import CHANNEL, MAX_CLAIMS, SEND, PeerMux
from confedge.turn.testing import turn_config

P = ("192.0.2.7", 5000)
P2 = ("192.0.2.7", 5002)


def test_claims_are_exclusive_per_socket() -> None:
    mux: PeerMux[str] = PeerMux()
    assert mux.claim("a", P, CHANNEL) == ""
    assert mux.claim("a", P, SEND) == ""  # its own again: fine
    assert mux.claim("b", P, CHANNEL) == "in use by another allocation"  # nothing changes
    assert mux.claim("b", P, SEND) == "in use by another allocation"
    assert mux.owner_of(P) == "a"
    assert mux.claim("b", P2, CHANNEL) == ""  # another port of the same IP is another peer
    assert mux.route(P) == "a"
    assert mux.route(P2) == "b"


def test_unknown_peer_delivered_only_when_unambiguous() -> None:
    mux: PeerMux[str] = PeerMux()
    assert mux.route(P) is None
    assert (mux.unknown, mux.ambiguous) == (1, 0)  # nobody has a permission (§9)
    mux.add_permission("a", P[0])
    assert mux.route(P) == "a"  # one allocation may receive from this IP: it gets it
    mux.add_permission("b", P[0])
    assert mux.route(P) is None  # two: whose is it? dropped, counted
    assert (mux.unknown, mux.ambiguous) == (1, 1)
    mux.claim("b", P, SEND)
    assert mux.route(P) == "b"  # a claim decides
    assert mux.route(P2) is None
    mux.remove_permission("a", P[0])
    assert mux.route(P2) == "b"  # unambiguous again


def test_permission_expiry_releases_send_claims_only() -> None:
    mux: PeerMux[str] = PeerMux()
    mux.add_permission("a", P[0])
    mux.claim("a", P, SEND)
    mux.claim("a", P2, SEND | CHANNEL)
    mux.remove_permission("a", P[0])  # §9: the permission lapsed
    assert mux.owner_of(P) is None  # free for another allocation
    assert mux.claim("b", P, CHANNEL) == ""
    assert mux.owner_of(P2) == "a"  # its channel still holds it
    mux.release("a", P2, CHANNEL)  # the channel expired (§11)
    assert mux.owner_of(P2) is None
    assert mux.owned == {"b": {P}}


def test_allocation_end_frees_everything() -> None:
    mux: PeerMux[str] = PeerMux()
    mux.add_permission("a", P[0])
    mux.add_permission("b", P[0])
    mux.claim("a", P, CHANNEL)
    mux.claim("a", P2, SEND)
    mux.remove("a", [P[0]])
    assert mux.claims == {}
    assert mux.perms == {P[0]: {"b"}}
    assert mux.route(("192.0.2.7", 9)) == "b"
    assert mux.claim("b", P, CHANNEL) == ""


def test_claims_per_allocation_are_capped() -> None:
    """A client spraying Send indications over a permitted IP's ports cannot grow the table
    without bound: beyond MAX_CLAIMS it is refused like a conflict, until claims end."""
    mux: PeerMux[str] = PeerMux()
    mux.add_permission("a", P[0])
    for port in range(MAX_CLAIMS):
        assert mux.claim("a", (P[0], port), SEND) == ""
    assert "already uses 1024 peer addresses" in mux.claim("a", (P[0], 65000), SEND)
    assert mux.claim("a", (P[0], 7), CHANNEL) == ""  # one it holds: still fine
    assert mux.claim("b", (P[0], 65000), SEND) == ""  # the cap is per allocation
    mux.remove_permission("a", P[0])  # the Send claims end with the permission
    assert len(mux.owned["a"]) == 1
    assert mux.claim("a", (P[0], 65001), SEND) == ""


def test_config_errors_name_key_value_and_fix() -> None:

    assert turn_config().turn.relay_multiplex == 0  # off by default
    assert turn_config(relay_multiplex=8).turn.relay_multiplex == 8
    for value, words in (
        (True, "true is not a number of shared relay sockets"),
        ("4", "'4' is not a number of shared relay sockets"),
        (65, "65 is out of range; use 0 (off) or 1-64"),
        (-1, "-1 is out of range"),
    ):
        with pytest.raises(ConfigError, match=r"turn\.relay_multiplex") as err:
            turn_config(relay_multiplex=value)
        assert words in str(err.value)
    with pytest.raises(ConfigError) as err:
        turn_config(relay_multiplex=3, relay_ports="50000-50001")
    assert (
        'turn.relay_multiplex: 3 shared sockets do not fit in turn.relay_ports "50000-50001" '
        "(2 ports)"
    ) in str(err.value)
