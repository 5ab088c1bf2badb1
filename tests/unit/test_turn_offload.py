"""turn.offload: the setting, and what "auto" and "ebpf" do where the offload cannot run.

The offload itself (loading, attaching, forwarding) is tested in network namespaces by
tests/integration/test_turn_offload_netns.py; these cases never attach anything: each fails
before loading (an address no interface holds, or a missing object file).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from confedge.config import ConfigError, parse_config
from confedge.turn.offload import BpfRelay, OffloadUnavailable, start_offload
from confedge.turn.service import TurnService, TurnStartError
from confedge.turn.testing import turn_config

# TEST-NET-1 (RFC 5737): on no interface of any host.
NOWHERE = "192.0.2.77"


def test_default_is_off() -> None:
    assert turn_config().turn.offload == "off"


def test_bad_value_names_key_and_choices() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"turn": {"offload": "kernel"}})
    text = str(err.value)
    assert "turn.offload" in text and "kernel" in text
    assert "auto" in text and "ebpf" in text and "off" in text


def test_off_loads_nothing() -> None:
    assert start_offload("off", {"127.0.0.1"}) is None


def test_auto_logs_why_and_relays_in_user_space(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="confedge.turn"):
        assert start_offload("auto", {NOWHERE}) is None
    assert f"no interface holds {NOWHERE}" in caplog.text
    assert "relaying in user space" in caplog.text


def test_ipv6_addresses_are_looked_up_too(caplog: pytest.LogCaptureFixture) -> None:
    """IPv6 is offloaded as well (maps cd_in6/cd_out6): a v6 address is looked for on the
    interfaces like a v4 one, and one no interface holds is named (RFC 3849 documentation
    prefix: on no host)."""
    with caplog.at_level(logging.INFO, logger="confedge.turn"):
        assert start_offload("auto", {"2001:db8::77"}) is None
    assert "no interface holds 2001:db8::77" in caplog.text


def test_ebpf_raises_with_the_reason() -> None:
    with pytest.raises(OffloadUnavailable, match=f"no interface holds {NOWHERE}"):
        start_offload("ebpf", {NOWHERE})


def test_missing_object_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(OffloadUnavailable, match=r"was not built.*clang"):
        BpfRelay({}, tmp_path / "relay.bpf.o")


async def test_service_start_error_names_the_key(tmp_path: Path) -> None:
    cfg = turn_config(
        host=NOWHERE,
        offload="ebpf",
        sections={"server": {"domain": "example.test", "internal_address": NOWHERE}},
    )
    svc = TurnService(cfg)
    with pytest.raises(TurnStartError, match=r"turn\.offload = ebpf: no interface holds"):
        await svc.start()
    await svc.close()
