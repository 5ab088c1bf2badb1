"""Helpers for tests and benchmarks that need a TURN server on loopback.

Like trio's testing package: small, typed, and used by the project's own tests, so that bench and
browser tests start the relay exactly the way the test suite does.
"""

from __future__ import annotations

from typing import Any

from confedge.config import Config, parse_config

__all__ = ["turn_config"]


def turn_config(
    *,
    mode: str = "restricted",
    host: str = "127.0.0.1",
    port: int = 0,
    relay_ports: str = "21000-24999",
    allowed_peers: list[str] | None = None,
    media_nodes: list[str] | None = None,
    username: str = "turnuser",
    password: str = "turnpass",  # noqa: S107 - test credential
    secrets: list[str] | None = None,
    domain: str = "example.test",
    **turn: Any,
) -> Config:
    """A Config with only TURN enabled on loopback (proxy off).

    Defaults: restricted mode, 127.0.0.0/8 safelisted as media nodes, 127.0.0.1 allowed as a
    peer (as coturn's --allow-loopback-peers), relay ports in the TURN tests' range.
    """
    section: dict[str, Any] = {
        "enabled": True,
        "mode": mode,
        "port": port,
        "relay_ports": relay_ports,
        "allowed_peers": ["127.0.0.1"] if allowed_peers is None else allowed_peers,
        "media_nodes": ["127.0.0.0/8"] if media_nodes is None else media_nodes,
        **turn,
    }
    if mode == "restricted":
        section["username"] = username
        section["password"] = password
    else:
        section["secrets"] = secrets or ["s3cret-current", "s3cret-previous"]
    return parse_config(
        {
            "server": {"domain": domain, "internal_address": host, "state_dir": "/tmp"},
            "proxy": {"enabled": False},
            "turn": section,
        }
    )
