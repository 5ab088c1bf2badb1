"""Adversarial QA of configuration validation (sans-I/O): each careless value gets one line
naming the key, the value and what is expected; secrets are never echoed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from confedge.config import ConfigError, load_config, parse_config

OFF = {"proxy": {"enabled": False}, "turn": {"enabled": False}}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"proxy": {"enabled": "no"}}, 'proxy.enabled: "no" is not true or false'),
        ({"proxy": {"enabled": 1}}, "proxy.enabled: 1 is not true or false"),
        ({"guard": {"bantime": "300"}}, 'guard.bantime: "300" is not a number'),
        ({"guard": {"maxretry": 2.5}}, "guard.maxretry: 2.5 is not a whole number"),
        ({"proxy": {"header_timeout": float("inf")}}, "proxy.header_timeout: inf is not a finite"),
        ({"guard": {"findtime": float("nan")}}, "guard.findtime: nan is not a finite"),
        ({"server": {"hostname": 5}}, "server.hostname: 5 is not text in quotes"),
        ({"turn": {"media_nodes": "10.0.0.1"}}, 'turn.media_nodes: "10.0.0.1" is not a list'),
        ({"server": 5}, "server: 5 is not a table"),
        ({"proxy": {"static": {"prefix": "/x/"}}}, "proxy.static: write each mount"),
        ({"proxy": {"static": [{"prefix": "/x/"}]}}, "proxy.static[0].path: missing"),
        ({"server": {"state_dir": " "}}, 'server.state_dir: "" is empty'),
        ({"turn": {"relay_address_v6": "10.0.0.1"}}, 'turn.relay_address_v6: "10.0.0.1" is not'),
        ({"tls": {"key": "/k.pem"}}, 'tls.key: "/k.pem" is set but tls.cert is empty'),
    ],
)
def test_wrong_values(data: dict[str, Any], expected: str) -> None:
    merged: dict[str, Any] = {k: dict(v) for k, v in OFF.items()}
    for section, values in data.items():
        base = merged.get(section)
        merged[section] = (
            {**base, **values} if isinstance(base, dict) and isinstance(values, dict) else values
        )
    found = problems(merged)
    assert sum(p.startswith(expected) for p in found) == 1, found


def test_every_bad_node_is_reported_with_its_index() -> None:
    found = problems({"proxy": {"nodes": ["ok", "ftp://x", 5, "a:99999"]}, "turn": OFF["turn"]})
    assert [p.split(":")[0] for p in found] == [
        "proxy.nodes[1]",
        "proxy.nodes[2]",
        "proxy.nodes[3]",
    ]


def test_secrets_are_never_echoed() -> None:
    found = problems({"proxy": OFF["proxy"], "turn": {"username": "u", "password": "hunter2\x07"}})
    assert found == [
        "turn.password: not usable for TURN (SASLprep: prohibited character U+0007); "
        "use printable text"
    ]
    found = problems({"proxy": OFF["proxy"], "turn": {"mode": "permissive", "secrets": ["s", ""]}})
    assert (
        len(found) == 1
        and found[0].startswith("turn.secrets")
        and "empty shared secret" in found[0]
    )


def test_relay_address_must_be_concrete_and_ports_distinct() -> None:
    found = problems(
        {
            "server": {"internal_address": "0.0.0.0"},
            "proxy": {"nodes": ["n"], "https_port": 8443, "http_port": 8443},
            "turn": {"username": "u", "password": "p", "port": 9090},
        }
    )
    assert any(
        p.startswith('server.internal_address: "0.0.0.0" cannot be a TURN relay') for p in found
    )
    assert (
        "proxy.http_port: 8443 is also proxy.https_port; two listeners cannot share a port" in found
    )
    assert any(p.startswith("management.port: 9090 is also turn.port") for p in found)
    # With an external address the internal one may be the wildcard; port 0 never clashes.
    parse_config(
        {
            "server": {"internal_address": "0.0.0.0", "external_address": "192.0.2.5"},
            "proxy": {"nodes": ["n"], "https_port": 0, "http_port": 0},
            "turn": {"username": "u", "password": "p", "port": 0, "tls_port": 0},
            "management": {"port": 0},
        }
    )


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf[proxy]\nenabled = false\n[turn]\nenabled = false\n")
    assert load_config(path).proxy.enabled is False
