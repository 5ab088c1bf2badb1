"""confedge.setup without processes: answers into values, the document that keeps what the
operator wrote, the atomic write, the question flow, and the reference's peer-range arithmetic."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest

from confedge.setup.document import ConfigDocument, atomic_write
from confedge.setup.questions import State, initial_state
from confedge.setup.reference import _seconds, _subtract
from confedge.setup.values import AnswerError, convert, field_kind
from confedge.setup.wizard import LinePrompter, ask_all


def test_text_is_read_by_the_keys_type() -> None:
    assert field_kind("proxy.csp") == "bool" and convert("proxy.csp", "Yes") is True
    assert convert("proxy.csp", "off") is False
    assert field_kind("proxy.https_port") == "int" and convert("proxy.https_port", " 8443 ") == 8443
    assert field_kind("guard.findtime") == "float" and convert("guard.findtime", "0.5") == 0.5
    assert convert("guard.findtime", "300") == 300  # written as 300, not 300.0
    assert convert("proxy.nodes", "10.0.0.11, 10.0.0.12 10.0.0.13") == [
        "10.0.0.11",
        "10.0.0.12",
        "10.0.0.13",
    ]
    assert convert("management.networks", "none") == []
    assert field_kind("server.external_address") == "optional"
    assert convert("server.external_address", "") is None  # unset: one interface
    assert field_kind("guard.ban_status") == "int"  # Literal[429, 403]
    assert field_kind("proxy.static") == "table"
    with pytest.raises(AnswerError, match="unknown key"):
        convert("proxy.nope", "1")


COMMENTED = """\
# top comment
[server]
hostname = "edge"  # inline
domain = "example.com"

[management]
port = 9191
"""


def test_document_keeps_comments_order_and_unasked_keys() -> None:
    doc = ConfigDocument(COMMENTED)
    doc.set("server.hostname", "edge")  # same value: the item (and its comment) is kept
    assert doc.render() == COMMENTED and not doc.changed
    doc.set("server.domain", "example.org")
    doc.set("turn.mode", "permissive")  # a new section goes before [management]
    doc.set("turn.secrets", ["s1"])
    text = doc.render()
    assert text.startswith('# top comment\n[server]\nhostname = "edge"  # inline\n')
    assert 'domain = "example.org"' in text
    assert text.index("[turn]") < text.index("[management]")
    assert "port = 9191" in text
    assert 'secrets = ["****"]' in doc.render_masked()
    doc.set("server.domain", None)
    assert "domain" not in doc.render()
    assert doc.get("turn.secrets") == ["s1"] and doc.get("server.nope") is None


def test_atomic_write_keeps_a_backup_and_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "confedge.toml"
    assert atomic_write(path, "a = 1\n") is None
    path.chmod(0o644)
    backup = atomic_write(path, "a = 2\n")
    assert backup == tmp_path / "etc" / "confedge.toml.bak"
    assert backup.read_text() == "a = 1\n" and stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert path.read_text() == "a = 2\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == ["confedge.toml", "confedge.toml.bak"]


def _state(text: str = "") -> State:
    return initial_state(ConfigDocument(text).get, [])


def test_wizard_reasks_with_the_reason_and_skips_what_does_not_apply() -> None:
    answers = iter(
        [
            "3", "1",  # interfaces: 3 is refused, then 1
            "127.0.0.1", "edge", "example.com",
            "no",  # no proxy: its node, balance and CSP questions are skipped
            "no",  # no TURN: no TURN questions
            "", "no",
        ]
    )  # fmt: skip
    shown: list[str] = []
    state = _state()
    ask_all(state, LinePrompter(lambda: next(answers) + "\n"), shown.append)
    assert '  ! "3" is not 1 or 2 (network interfaces)' in shown
    titles = [line for line in shown if line.startswith("[")]
    assert titles[-1].endswith("PIN guard")
    assert not any("Balancing" in t or "TURN mode" in t for t in titles)
    assert state.values["proxy.enabled"] is False and state.values["turn.enabled"] is False


def test_a_blank_secret_is_generated_and_a_blank_kept_one_stays() -> None:
    answers = iter(
        ["1", "", "", "", "", "10.0.0.11", "", "", "", "", "turnuser", "", "", "", "", "", ""]
    )
    state = _state()
    ask_all(state, LinePrompter(lambda: next(answers) + "\n"), lambda _: None)
    assert "turn.password" in state.generated and len(state.values["turn.password"]) == 43
    state = _state('[turn]\nusername = "u"\npassword = "kept"\n[proxy]\nnodes = ["10.0.0.11"]\n')
    answers = iter([""] * 20)
    ask_all(state, LinePrompter(lambda: next(answers) + "\n"), lambda _: None)
    assert state.values["turn.password"] == "kept" and not state.generated


def test_denied_minus_allowed_is_coturns_allowed_wins() -> None:
    allowed = [ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("10.1.0.0/16")]
    rest = _subtract([ipaddress.ip_network("0.0.0.0/0")], allowed)
    for ip, refused in (("127.0.0.2", False), ("10.1.2.3", False), ("127.0.0.3", True),
                        ("8.8.8.8", True), ("10.2.0.1", True), ("255.255.255.255", True)):  # fmt: skip
        assert any(ipaddress.ip_address(ip) in n for n in rest) is refused, ip
    # Ranges that do not overlap an allowed one pass through untouched.
    assert _subtract([ipaddress.ip_network("192.168.0.0/16")], allowed) == [
        ipaddress.ip_network("192.168.0.0/16")
    ]


def test_fail2ban_durations() -> None:
    assert _seconds("300") == 300 and _seconds("10m") == 600 and _seconds("1h") == 3600
    assert _seconds("2d") == 172800
    with pytest.raises(ValueError):
        _seconds("soon")
    # fail2ban's other words and sums: "mo" is a month and "y" a year, never minutes or bare
    # seconds (they were read as 60 s and 1 s); "-1" is its permanent ban.
    assert _seconds("1mo") == round(365.2425 * 86400 / 12, 3) and _seconds("1y") > 365 * 86400
    assert (
        _seconds("1h 30m") == 5400 and _seconds("10min") == 600 and _seconds("2 weeks") == 1209600
    )
    assert _seconds(" 600 ") == 600 and _seconds("2.5h") == 9000 and _seconds("-1") == -1
    for bad in ("1e400", "", "5 fortnights", "1h x"):
        with pytest.raises(ValueError):
            _seconds(bad)


def test_a_bad_value_in_the_file_is_reasked_not_kept() -> None:
    state = _state('[server]\ninternal_address = "10.0.0.x"\n')
    answers = iter(["1", "", "10.0.0.5"])
    shown: list[str] = []
    with pytest.raises(StopIteration):
        ask_all(state, LinePrompter(lambda: next(answers) + "\n"), shown.append)
    assert '  ! "10.0.0.x" is not an IP address (e.g. "10.0.0.5" or "2001:db8::5")' in shown
    assert state.values["server.internal_address"] == "10.0.0.5"
