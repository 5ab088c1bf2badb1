"""Helpers for the management-listener tests: a raw HTTP/1.1 client and a Prometheus text checker.

The client is deliberately hand-written on asyncio streams: tests need to choose the source
address (ACL), send malformed or pipelined bytes, and see exactly what came back.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_replies(data: bytes, *, head: bool = False) -> list[Reply]:
    """Split a byte stream of HTTP/1.1 answers (Content-Length framed) into replies."""
    out: list[Reply] = []
    while data:
        head_end = data.index(b"\r\n\r\n")
        lines = data[:head_end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = 0 if head else int(headers.get("content-length", "0"))
        start = head_end + 4
        out.append(Reply(status, headers, data[start : start + n]))
        data = data[start + n :]
    return out


async def raw(
    port: int,
    payload: bytes,
    *,
    host: str = "127.0.0.1",
    local: str | None = None,
    timeout: float = 5.0,
) -> bytes:
    """Send `payload`, half-close, read until the server closes; return everything read."""
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(local, 0) if local else None
    )
    try:
        writer.write(payload)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def get(
    port: int,
    path: str,
    *,
    method: str = "GET",
    host_header: str = "127.0.0.1",
    local: str | None = None,
) -> Reply:
    req = f"{method} {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n"
    data = await raw(port, req.encode(), local=local)
    replies = parse_replies(data, head=method == "HEAD")
    assert len(replies) == 1, data[:500]
    return replies[0]


# -- Prometheus text exposition format (version 0.0.4) -------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(
    rf"^(?P<name>{_NAME})(?:\{{(?P<labels>{_LABEL}(?:,{_LABEL})*)?\}})? (?P<value>\S+)$"
)
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A strict reader of the subset of the format we emit; raises AssertionError on any fault.

    Checks: the text ends with a line feed; HELP and TYPE come once per family, before its
    samples; a family's samples are contiguous; counters end in _total; every value parses as a
    float; no sample (name + labels) repeats.
    """
    assert text.endswith("\n"), "exposition must end with a line feed"
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    types: dict[str, str] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        assert line, "no empty lines in our output"
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert re.fullmatch(_NAME, name), line
            assert name not in families, f"family {name} written twice"
            families[name] = {}
            current = name
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name == current, f"TYPE for {name} not right after its HELP"
            assert kind in _TYPES, line
            assert name not in types
            types[name] = kind
            if kind == "counter":
                assert name.endswith("_total"), f"counter {name} must end in _total"
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m is not None, f"not a sample line: {line!r}"
        name = m["name"]
        if current is not None and types.get(current) == "histogram" and name != current:
            # A histogram's samples are <family>_bucket/_sum/_count, each kept as its own key.
            assert name[len(current) :] in ("_bucket", "_sum", "_count"), line
            families.setdefault(name, {})
            types.setdefault(name, "histogram")
            current_sample = name
        else:
            current_sample = current
        assert name == current_sample and name in types, f"sample {name} outside its family"
        labels: tuple[tuple[str, str], ...] = ()
        if m["labels"]:
            pairs = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"', m["labels"])
            labels = tuple(sorted(pairs))
        value = float(m["value"])
        assert not math.isnan(value) or m["value"] == "NaN"
        assert labels not in families[name], f"duplicate sample {line!r}"
        families[name][labels] = value
    return families


def metric(
    families: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float:
    return families[name][tuple(sorted(labels.items()))]
