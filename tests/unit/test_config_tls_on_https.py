"""turn.tls_on_https: off by default, and only where both of its halves are running."""

from __future__ import annotations

from pathlib import Path

import pytest

from confedge.cli import main
from confedge.config import ConfigError, parse_config

BASE = {
    "proxy": {"nodes": ["10.0.0.11"]},
    "turn": {"username": "turnuser", "password": "secret"},
}


def problems(proxy: dict[str, object], turn: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"proxy": {**BASE["proxy"], **proxy}, "turn": {**BASE["turn"], **turn}})
    return info.value.problems


def test_off_by_default_and_on_when_asked() -> None:
    assert parse_config(BASE).turn.tls_on_https is False
    on = {**BASE, "turn": {**BASE["turn"], "tls_on_https": True}}
    assert parse_config(on).turn.tls_on_https is True


def test_needs_the_proxy() -> None:
    assert problems({"enabled": False}, {"tls_on_https": True}) == [
        "turn.tls_on_https: true needs both the proxy (its HTTPS listener takes the connections) "
        "and TURN (it serves them), but proxy.enabled is false; set it to true or set "
        "turn.tls_on_https = false"
    ]


def test_needs_turn() -> None:
    (line,) = problems({}, {"enabled": False, "tls_on_https": True})
    assert "but turn.enabled is false; set it to true or set turn.tls_on_https = false" in line


def test_needs_both() -> None:
    (line,) = problems({"enabled": False}, {"enabled": False, "tls_on_https": True})
    assert "proxy.enabled and turn.enabled are false; set them to true" in line


def test_not_a_bool() -> None:
    assert problems({}, {"tls_on_https": "yes"}) == [
        'turn.tls_on_https: "yes" is not true or false (without quotes)'
    ]


def test_check_command_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[proxy]\nenabled = false\n[turn]\nusername = "u"\npassword = "p"\ntls_on_https = true\n'
    )
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--config", str(path)])
    assert exit_.value.code == 2
    assert "turn.tls_on_https: true needs both the proxy" in capsys.readouterr().err


def test_tls_port_on_the_https_port_points_at_the_option() -> None:
    """The natural mistake when TURN should be on 443: the clash names the way to do it."""
    (line,) = problems({"https_port": 443}, {"tls_port": 443})
    assert line == (
        "turn.tls_port: 443 is also proxy.https_port; two listeners cannot share a port; to "
        "serve TURN over TLS on the HTTPS port set turn.tls_on_https = true (and "
        "turn.tls_port = 0)"
    )
    on = {"proxy": {**BASE["proxy"]}, "turn": {**BASE["turn"], "tls_on_https": True}}
    on["turn"]["tls_port"] = 0
    assert parse_config(on).turn.tls_port == 0
