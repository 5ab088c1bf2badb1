"""When the TURN service re-reads the host's addresses (simulated time, injected reader)."""

from __future__ import annotations

import logging

import pytest

from confedge.turn.service import HostAddressWatch, read_host_addresses


def test_watch_reads_at_start_then_every_interval_and_reports_changes_only() -> None:
    now_addrs = {"127.0.0.1", "192.0.2.2"}
    reads: list[float] = []

    def read() -> set[str]:
        reads.append(0)
        return set(now_addrs)

    w = HostAddressWatch(read, interval=60.0)
    assert w.poll(0.0) == frozenset({"127.0.0.1", "192.0.2.2"})  # start-up: always a set
    assert w.poll(1.0) is None and w.poll(59.9) is None  # not due: not even read
    assert len(reads) == 1
    assert w.poll(60.0) is None  # due, read, unchanged
    now_addrs.add("198.51.100.9")
    assert w.poll(61.0) is None  # changed, but not due yet
    assert w.poll(120.0) == frozenset({"127.0.0.1", "192.0.2.2", "198.51.100.9"})
    now_addrs.discard("192.0.2.2")
    assert w.poll(180.0) == frozenset({"127.0.0.1", "198.51.100.9"})
    assert len(reads) == 4


def test_watch_keeps_the_last_set_when_a_read_fails(caplog: pytest.LogCaptureFixture) -> None:
    fail = [False]

    def read() -> set[str]:
        if fail[0]:
            raise OSError(24, "Too many open files")
        return {"192.0.2.2"}

    w = HostAddressWatch(read, interval=10.0)
    assert w.poll(0.0) == frozenset({"192.0.2.2"})
    fail[0] = True
    with caplog.at_level(logging.WARNING, logger="confedge.turn"):
        assert w.poll(10.0) is None
    assert "cannot read this host's interface addresses" in caplog.text
    assert w.current == frozenset({"192.0.2.2"})
    fail[0] = False
    assert w.poll(20.0) is None  # same as before the failure: nothing to hand over


def test_read_host_addresses_sees_loopback() -> None:
    addrs = read_host_addresses()
    assert "127.0.0.1" in addrs


def test_start_reads_again_even_when_nothing_changed() -> None:
    """A service started a second time builds a new core, which needs the set again."""
    w = HostAddressWatch(lambda: {"192.0.2.2"}, interval=60.0)
    assert w.start(0.0) == frozenset({"192.0.2.2"})
    assert w.poll(1.0) is None
    assert w.start(2.0) == frozenset({"192.0.2.2"})
