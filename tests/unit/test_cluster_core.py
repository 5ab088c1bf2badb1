"""The cluster registry's pure parts: records, their validation, the [cluster] keys, and how the
status page and /metrics show other instances."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from confedge.admin.render import _Metrics
from confedge.admin.render_cluster import cluster_html, cluster_metrics
from confedge.cluster.core import (
    MAX_LISTED,
    AllocationRow,
    InstanceRecord,
    busiest,
    decode_record,
    instance_name,
    secret_fingerprint,
)
from confedge.config import ConfigError, parse_config

NOW = 1_800_000_000.0


def _row(client: str, up: int, down: int, created: float = NOW - 60) -> AllocationRow:
    return AllocationRow(client, "198.51.100.11:50001", "1800003600:alice", created, up, down)


def _record(**kw: Any) -> InstanceRecord:
    base: dict[str, Any] = {
        "instance": "edge-b",
        "state": "serving",
        "started": NOW - 100,
        "updated": NOW - 0.5,
        "turn": "10.0.0.12:3478",
        "fingerprint": secret_fingerprint(["s"]),
        "allocation_count": 1,
        "allocations": [_row("192.0.2.7:5000/udp", 10, 20)],
    }
    base.update(kw)
    return InstanceRecord(**base)


def test_record_round_trip() -> None:
    rec = _record()
    assert decode_record(rec.to_json()) == rec
    assert decode_record(rec.to_json().encode()) == rec


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("state"),
        lambda d: d.update(updated="yesterday"),
        lambda d: d.update(updated=-1),
        lambda d: d.update(allocation_count=True),
        lambda d: d.update(allocations={"a": 1}),
        lambda d: d["allocations"].append("x"),
        lambda d: d["allocations"][0].update(bytes_to_peer=-5),
        lambda d: d["allocations"][0].update(client=7),
        lambda d: d.update(instance="x" * 64),
    ],
)
def test_records_that_do_not_fit_are_refused(mutate: Any) -> None:
    d = json.loads(_record().to_json())
    mutate(d)
    assert decode_record(json.dumps(d)) is None


def test_garbage_and_absent_records() -> None:
    for raw in (None, "", "not json", "[]", "1", '{"allocations": []}', "[" * 100_000):
        assert decode_record(raw) is None


def test_unknown_state_is_shown_as_unknown() -> None:
    rec = decode_record(_record(state="exploding").to_json())
    assert rec is not None and rec.state == "unknown"


def test_busiest_first_and_capped() -> None:
    rows = [_row(f"192.0.2.{i}:1/udp", i, 0) for i in range(MAX_LISTED + 50)]
    top = busiest(rows)
    assert len(top) == MAX_LISTED
    assert top[0].client == f"192.0.2.{MAX_LISTED + 49}:1/udp"


def test_fingerprint_and_instance_name() -> None:
    assert secret_fingerprint([]) == ""
    fp = secret_fingerprint(["one", "old"])
    assert fp == secret_fingerprint(["one"]) != secret_fingerprint(["two"])
    assert "one" not in fp and len(fp) == 16
    assert instance_name("edge-a") == "edge-a"
    assert instance_name("") and "." not in instance_name("")


OFF = {"proxy": {"enabled": False}, "turn": {"enabled": False}}


def test_cluster_keys_validated() -> None:
    cfg = parse_config(
        {**OFF, "cluster": {"store": "redis://10.0.0.5:6379/0", "instance": "edge-a"}}
    )
    assert cfg.cluster.interval == 1.0 and cfg.cluster.ttl == 5.0
    assert parse_config(OFF).cluster.store == ""
    with pytest.raises(ConfigError) as exc:
        parse_config({**OFF, "cluster": {"store": "10.0.0.5:6379"}})
    assert 'cluster.store: "10.0.0.5:6379" is not a Redis URL' in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        parse_config({**OFF, "cluster": {"instance": "edge a/b"}})
    assert "cluster.instance" in str(exc.value) and "edge-a" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        parse_config({**OFF, "cluster": {"interval": 3.0, "ttl": 5.0}})
    assert "ttl: 5.0 is less than twice interval (3.0)" in str(exc.value)
    assert "ttl >= 6" in str(exc.value)


def _snap(store_up: bool = True) -> dict[str, Any]:
    other = json.loads(_record(allocation_count=3).to_json())
    other["allocations"][0]["client"] = "<script>:1/udp"
    return {
        "enabled": True,
        "instance": "edge-a",
        "state": "serving",
        "store": "redis://:****@10.0.0.5:6379/0",
        "store_up": store_up,
        "error": "" if store_up else "Connection refused",
        "last_contact": NOW - 30,
        "nonce_key_shared": True,
        "interval": 1.0,
        "ttl": 5.0,
        "instances": [
            {"instance": "edge-a", "self": True, "state": "serving", "age": 0.0,
             "turn": "10.0.0.11:3478", "same_secret": True, "allocation_count": 0,
             "allocations": []},
            {**other, "self": False, "age": 0.5, "same_secret": False},
        ],
    }  # fmt: skip


def test_page_lists_other_instances_allocations_escaped() -> None:
    page = cluster_html(_snap(), NOW)
    assert "Allocations on edge-b" in page and "Allocations on edge-a" not in page
    assert "&lt;script&gt;:1/udp" in page and "<script>" not in page
    assert "differs" in page  # edge-b's REST secret is not ours
    assert "2 more" in page  # 3 allocations, 1 listed
    down = cluster_html(_snap(store_up=False), NOW)
    assert "unreachable" in down and "last contact" in down
    assert "alone" in cluster_html({"enabled": False}, NOW)


def test_metrics_parse() -> None:
    m = _Metrics()
    cluster_metrics(m, _snap())
    fams = {f.name: f for f in text_string_to_metric_families("\n".join(m.lines) + "\n")}
    alloc = fams["confedge_cluster_instance_allocations"].samples
    assert {s.labels["instance"]: s.value for s in alloc} == {"edge-a": 0, "edge-b": 3}
    states = {
        (s.labels["instance"], s.labels["state"]): s.value
        for s in fams["confedge_cluster_instance_state"].samples
    }
    assert states[("edge-b", "serving")] == 1 and states[("edge-b", "draining")] == 0
    assert fams["confedge_cluster_store_up"].samples[0].value == 1
    empty = _Metrics()
    cluster_metrics(empty, {"enabled": False})
    assert empty.lines == []


class _Pipe:
    """A Redis pipeline whose first execute() waits on a future the test resolves."""

    def __init__(self, owner: _StoreAtTheTestsPace) -> None:
        self.owner = owner

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **kw: self

    async def execute(self) -> list[Any]:
        self.owner.executes += 1
        if self.owner.gate is not None:
            gate, self.owner.gate = self.owner.gate, None
            return await gate
        return [True, 1, 0, []]


class _StoreAtTheTestsPace:
    def __init__(self) -> None:
        self.gate: asyncio.Future[list[Any]] | None = None
        self.executes = 0

    def pipeline(self, transaction: bool = True) -> _Pipe:
        return _Pipe(self)

    async def aclose(self) -> None:
        return None


def test_close_while_a_publication_completes_does_not_hang() -> None:
    """close() cancels the registry loop in the same loop turn as its Redis reply arrives.

    Why: Python 3.11's asyncio.wait_for returns the inner result and drops the cancel when both
    land together; the loop then ran on and close() awaited it forever (a CI run hung 120 s in
    test_cluster_registry.py). The loop now bounds its round trip with asyncio.timeout.
    """
    from confedge.cluster.service import ClusterService

    async def main() -> None:
        cfg = parse_config(
            {
                "proxy": {"enabled": False},
                "turn": {"enabled": False},
                "cluster": {"store": "redis://127.0.0.1:1/0", "instance": "a", "interval": 0.2},
            }
        )
        svc = ClusterService(cfg, object())
        store = _StoreAtTheTestsPace()
        gate: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        store.gate = gate
        svc._r = store
        svc._task = asyncio.create_task(svc._run())
        while store.executes == 0:
            await asyncio.sleep(0)
        gate.set_result([True, 1, 0, []])
        # The reply and the cancel in one turn: close() must return, and leave the registry.
        await asyncio.wait_for(svc.close(), 2.0)
        # The publication, then the clean leave; more means the loop ran on past its cancel.
        assert store.executes == 2, f"{store.executes} pipeline runs"

    asyncio.run(main())
