#!/usr/bin/env python3
"""TURN relay benchmark: confedge against coturn, same machine, same run, alternating.

Usage:
    .venv/bin/python bench/turn/run.py            # full run, 3 rounds (~6-8 minutes)
    .venv/bin/python bench/turn/run.py --quick    # 1 round, short windows (~1 minute)

What it measures, per server and round (server order alternates between rounds so drift in the
shared machine's load does not favour either):

* relay throughput: packets/s DELIVERED at a UDP peer sink, and the offered rate, for 200- and
  1200-byte payloads through 1 allocation and through 50 allocations (ChannelData, offered as
  fast as the generator can, which on this host exceeds what either server relays);
* CPU per relayed packet: server utime+stime (/proc/<pid>/stat, whole process tree) divided by
  delivered packets, both at full load and at a fixed offered rate both servers sustain;
* allocations/s: full Allocate exchanges (401 challenge + authenticated Allocate), pipelined;
* RSS with 1,000 allocations (each with a permission and a channel).

Relay load comes from the C sender and sink (bench/turn/turnload.c: sendmmsg/recvmmsg
batches), built at start with the system C compiler into bench/turn/build/, or, with
`--generator python` or no compiler, from the Python loops in loadgen.py; the TURN handshakes
are Python either way. Besides the server's own CPU, each relay scenario reports whole-machine
CPU per delivered packet (/proc/stat) and a "server-attributable" figure: the machine minus the
generator's and the sink's process CPU.

`--gen-packet` makes the C sender cheaper: instead of a UDP sendmmsg per batch on each
allocation's socket (socket, route and netfilter output path per packet, in the sender's
context), it writes the same ChannelData as whole Ethernet/IPv4/UDP frames, carrying each
socket's own 5-tuple and a valid checksum, into lo with an AF_PACKET socket (sendmmsg,
PACKET_QDISC_BYPASS; needs CAP_NET_RAW). Every server then sees the allocation's packets arrive
on lo's receive path exactly as from a NIC (TC ingress, IP input, UDP socket), so the comparison
stays fair; delivered packets are still counted at the sink. UDP GSO was rejected for this: on lo
the GSO super-packet reaches TC ingress unsegmented, so the offload would not recognise it.

Before the rounds and after them it records the host's state (`turnload calib`: the cost of a
bare system call and of one loopback UDP datagram), since this shared VM's speed moves by 2-3x
between days and the servers' ratios with it.

It prints a markdown table of medians with confedge/coturn ratios and writes every sample to
bench/results/turn-<timestamp>.json (gitignored).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cgen
import loadgen
import servers

# The peer sink's UDP port: the first free one from here (Harness.sink_port).
SINK_PORTS = range(40300, 40350)
# Same relay range size for both (1,800 ports), disjoint; 44600-44999 is left to the e2e tests.
CONFEDGE = servers.ServerSpec("confedge", 40100, 41000, 42799)
COTURN = servers.ServerSpec("coturn", 40200, 42800, 44599)
# After Refresh(lifetime 0) coturn frees relay ports on its next timer tick (~1 s); both servers
# get the same pause so that every scenario starts with the full range free.
SETTLE = 1.5
# --only: what run_server measures, in this order ("rss" first, on the fresh server).
SCENARIOS = ("rss", "relay", "paced", "alloc")
EXIT_BUSY = 75  # EX_TEMPFAIL: another run holds the lock
FULL_STEPS = [loadgen.PROBE, loadgen.ALLOCATE, loadgen.PERMISSION, loadgen.CHANNEL]


@dataclass(frozen=True)
class CGenerator:
    """Use the C sender and sink (turnload.c) with these threads and pinning."""

    binary: Path
    threads: int = 1
    sink_threads: int = 1
    cpus: str = ""  # comma list the C threads are pinned to, "" = the scheduler decides
    packet: bool = False  # the sender writes frames into lo with AF_PACKET (--gen-packet)


class Harness:
    """The sink and the worker processes, shared by every scenario of one server session.

    With `gen` (the C generator) the workers still do every TURN handshake in Python, then each
    sending worker hands its allocation sockets to a C sender, and the sink is the C sink. The
    counters are the same shared slots either way (cgen.Slots).
    """

    def __init__(
        self,
        ctx: Any,
        n_workers: int,
        gen: CGenerator | None = None,
        spread_peers: bool = False,
    ) -> None:
        (self.sink_port,) = servers.free_udp_ports(SINK_PORTS, 1)
        self.spread_peers = spread_peers
        self.ctx = ctx
        self.gen = gen
        self.slots = cgen.Slots(n_workers)
        self.counts = self.slots.counts
        self.sink_stop = self.slots.sink_stop
        self.sink: Any
        self.c_sender: loadgen.CSender | None = None
        if gen is None:
            ready = ctx.Event()
            self.sink = ctx.Process(
                target=loadgen.sink_main,
                args=(
                    self.sink_port,
                    self.counts,
                    self.sink_stop,
                    ready,
                    "0.0.0.0" if spread_peers else "127.0.0.1",  # spread peers: 127.x.y.z
                ),
            )
            self.sink.start()
            if not ready.wait(10):
                raise RuntimeError("the peer sink did not start")
        else:
            self.c_sender = loadgen.CSender(
                str(gen.binary),
                self.slots.path,
                cgen.SEND_STOP,
                cgen.SENT0,
                gen.threads,
                gen.cpus,
                gen.packet,
            )
            cmd = [
                str(gen.binary),
                "sink",
                "--shm",
                self.slots.path,
                "--stop",
                str(cgen.SINK_STOP),
                "--count",
                str(cgen.SINK_PACKETS),
                "--port",
                str(self.sink_port),
                "--threads",
                str(gen.sink_threads),
            ]
            if gen.cpus:
                cmd += ["--cpus", gen.cpus]
            if spread_peers:
                cmd.append("--any")  # spread peers: 127.x.y.z
            self.sink = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert self.sink.stdout is not None
            if self.sink.stdout.readline().strip() != "ready":
                self.sink.kill()
                raise RuntimeError("the C peer sink did not start")
        self.n_workers = n_workers
        self.sent = self.slots.sent
        self.stop = self.slots.stop
        self.workers: list[tuple[Any, Connection]] = []
        self._source = 0
        self.settle = SETTLE

    def loadgen_pids(self) -> list[int]:
        """The generator's and the sink's processes (workers, their C senders, the sink)."""
        return servers.tree_pids(self.sink.pid, *(p.pid for p, _ in self.workers))

    def source_ip(self) -> str:
        """A fresh loopback source address per setup batch.

        Why: the kernel reuses ephemeral ports, and a server that still holds a released
        allocation for that 5-tuple answers 437 (Allocation Mismatch).
        """
        self._source += 1
        return f"127.1.{self._source // 250}.{self._source % 250 + 1}"

    def release(self, k: int) -> None:
        self.ask([("release", 64)] * k)
        time.sleep(self.settle)

    def spawn(self, target: loadgen.Target) -> None:
        for i in range(self.n_workers):
            parent, child = self.ctx.Pipe()
            p = self.ctx.Process(
                target=loadgen.worker_main, args=(i, target, child, self.sent, self.stop)
            )
            p.start()
            self.workers.append((p, parent))

    def reap(self) -> None:
        for p, conn in self.workers:
            conn.send(("quit",))
            p.join(10)
            if p.is_alive():
                p.kill()
        self.workers = []

    def close(self) -> None:
        self.reap()
        self.sink_stop[0] = 1
        if self.gen is None:
            self.sink.join(5)
        else:
            try:
                self.sink.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.sink.kill()
                self.sink.communicate()
        self.slots.close()

    def ask(self, cmds: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Send one command per worker (in parallel) and gather the replies."""
        for (_, conn), cmd in zip(self.workers, cmds, strict=False):
            conn.send(cmd)
        return [conn.recv() for (_, conn), _ in zip(self.workers, cmds, strict=False)]


def split(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def relay(
    h: Harness,
    server: servers.Server | None,
    n_allocs: int,
    size: int,
    rate: float,
    senders: int,
    warmup: float,
    window: float,
) -> dict[str, Any]:
    """Offer ChannelData through `n_allocs` allocations and count what reaches the sink."""
    k = min(senders, n_allocs, h.n_workers)
    parts = split(n_allocs, k)
    if server is None:
        replies = h.ask([("direct", n) for n in parts])
    else:
        src = h.source_ip()
        replies = h.ask([("alloc", n, FULL_STEPS, 32, 30.0, src) for n in parts])
        failed = sum(r[2] for r in replies)
        if failed:
            errors = sorted({e for r in replies for e in r[6]})
            h.release(k)
            return {"error": f"{failed} of {n_allocs} allocations failed: {errors}"}
    for i in range(h.n_workers):
        h.sent[i] = 0
    h.stop[0] = 0
    for (_, conn), _ in zip(h.workers, parts, strict=False):
        conn.send(("blast", size, rate / k if rate else 0, h.c_sender))

    def sample() -> tuple[float, int, int, int, float, float, float, float]:
        user, system = server.cpu_times() if server else (0.0, 0.0)
        packets, octets = _delivered(h.counts)
        return (
            time.monotonic(),
            packets,
            octets,
            sum(h.sent[:k]),
            user,
            system,
            machine_busy_s(),
            sum(servers.cpu_times_of(gen_pids)),
        )

    time.sleep(warmup)
    gen_pids = h.loadgen_pids()  # walked once, before the window: the set does not change
    s0 = sample()
    time.sleep(window)
    s1 = sample()
    h.stop[0] = 1
    gen = [conn.recv() for (_, conn), _ in zip(h.workers, parts, strict=False)]
    h.release(k)  # also lets the sink drain before the next scenario
    dt = s1[0] - s0[0]
    delivered = s1[1] - s0[1]
    out: dict[str, Any] = {
        "allocations": n_allocs,
        "payload": size,
        "offered_rate": rate,
        "offered_pps": (s1[3] - s0[3]) / dt,
        "delivered_pps": delivered / dt,
        # what the generator got into the kernel but the sink never saw (server or kernel
        # buffers dropped it), as a share of the offered packets
        "dropped_pct": max(0.0, 100.0 * (1 - delivered / (s1[3] - s0[3])))
        if s1[3] > s0[3]
        else 0.0,
        "delivered_mean_bytes": (s1[2] - s0[2]) / delivered if delivered else 0,
        "generator_cpu_s": sum(g[2] for g in gen),
        # generator + sink processes (C or Python), in the window, from /proc/<pid>/stat
        "loadgen_cpu_util": (s1[7] - s0[7]) / dt,
    }
    if server is not None:
        user, system = s1[4] - s0[4], s1[5] - s0[5]
        out["server_cpu_util"] = (user + system) / dt
        per = 1e6 / delivered if delivered else 0.0
        out["server_cpu_us_per_pkt"] = (user + system) * per if delivered else None
        out["server_user_us_per_pkt"] = user * per if delivered else None
        out["server_sys_us_per_pkt"] = system * per if delivered else None
        # The whole machine (generator and sink included, the same for every server; softirq
        # included, which is where the kernel offload's work is): what a packet costs in all.
        busy = s1[6] - s0[6]
        out["machine_cpu_util"] = busy / dt
        out["machine_cpu_us_per_pkt"] = busy * per if delivered else None
        # "Server-attributable": the whole machine minus the generator's and the sink's own
        # process CPU. It keeps the softirq the relay causes wherever it is accounted, but a
        # loopback send also charges the receive path to the sender, so it is an estimate.
        attributable = max(0.0, busy - (s1[7] - s0[7]))
        out["attributable_cpu_us_per_pkt"] = attributable * per if delivered else None
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _delivered(counts: memoryview) -> tuple[int, int]:
    """The sink's [packets, bytes], read as a pair that belongs together.

    Why: the sink adds a batch's packets, then its bytes; a read between the two adds gave a
    mean size off by a fraction of a byte (1199.93 for 1200-byte payloads in one CI run). A pair
    read twice alike had no add land inside it.
    """
    pair = (int(counts[0]), int(counts[1]))
    for _ in range(1000):
        again = (int(counts[0]), int(counts[1]))
        if again == pair:
            break
        pair = again
    return pair


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat: user, nice, system, irq,
    softirq, steal; idle and iowait excluded)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def allocation_rate(
    h: Harness, server: servers.Server, n: int, batches: int, window: int = 32
) -> dict[str, Any]:
    """Complete n Allocate exchanges (challenge + authenticated request) per batch, pipelined.

    Several batches (each released before the next) give a longer timed interval than one batch
    that fits the relay port range. Only the allocation phases are timed.
    """
    steps = [loadgen.PROBE, loadgen.ALLOCATE]
    ok = 0
    elapsed = 0.0
    cpu = 0.0
    gen_cpu = 0.0
    busy = 0.0
    wall = 0.0
    per_thread: dict[int, float] = {}
    errors: set[str] = set()
    for _ in range(batches):
        src = h.source_ip()
        c0, m0, w0, t0 = (
            server.cpu_seconds(),
            machine_busy_s(),
            time.monotonic(),
            server.thread_cpu(),
        )
        replies = h.ask([("alloc", m, steps, window, 60.0, src) for m in split(n, h.n_workers)])
        cpu += server.cpu_seconds() - c0
        busy += machine_busy_s() - m0
        wall += time.monotonic() - w0
        for tid, s in server.thread_cpu().items():
            per_thread[tid] = per_thread.get(tid, 0.0) + s - t0.get(tid, 0.0)
        ok += sum(r[1] for r in replies)
        elapsed += max(r[4] for r in replies) - min(r[3] for r in replies)
        gen_cpu += sum(r[5] for r in replies)
        errors.update(e for r in replies for e in r[6])
        h.release(h.n_workers)
    return {
        "requested": n * batches,
        "completed": ok,
        "allocations_per_s": ok / elapsed,
        "server_cpu_us_per_alloc": cpu / ok * 1e6 if ok else None,
        "generator_cpu_s": gen_cpu,
        # The whole machine's busy CPUs over the batches (2.0 = both cores of this host):
        # below the core count, the pipeline waits on latency rather than on CPU.
        "machine_busy_cpus": busy / wall if wall > 0 else None,
        # The server's busiest thread's share of one CPU (1.0: that thread is the limit).
        "busiest_thread_cpu": max(per_thread.values()) / wall if per_thread and wall > 0 else None,
        "elapsed_s": elapsed,
        "errors": sorted(errors),
    }


def memory(h: Harness, server: servers.Server, n: int) -> dict[str, Any]:
    """RSS of the server process tree idle, then holding n allocations (permission + channel each)."""
    before = server.rss_bytes()
    src = h.source_ip()
    replies = h.ask([("alloc", m, FULL_STEPS, 32, 60.0, src) for m in split(n, h.n_workers)])
    time.sleep(0.5)
    held = server.rss_bytes()
    ok = sum(r[1] for r in replies)
    h.release(h.n_workers)
    return {
        "allocations": ok,
        "rss_before_mib": before / 2**20,
        "rss_mib": held / 2**20,
        "rss_kib_per_alloc": (held - before) / 1024 / ok if ok else None,
        "errors": sorted({e for r in replies for e in r[6]}),
    }


def run_server(
    name: str,
    start: Callable[[], servers.Server],
    args: argparse.Namespace,
    ctx: Any,
) -> dict[str, Any]:
    server = start()
    h = Harness(ctx, args.workers, args.c_generator, args.spread_peers)
    h.settle = args.settle
    result: dict[str, Any] = {
        "rss_idle_mib": server.rss_bytes() / 2**20,
        "loadavg_before": Path("/proc/loadavg").read_text().split()[0],
    }
    try:
        h.spawn(
            loadgen.Target(
                server.address,
                servers.USERNAME,
                servers.PASSWORD,
                ("127.0.0.1", h.sink_port),
                spread_peers=args.spread_peers,
            )
        )
        # Memory first, on the fresh server, so "per allocation" is not blurred by what the
        # allocator kept from earlier scenarios.
        if "rss" in args.only:
            result["memory"] = memory(h, server, args.rss_allocs)
            mem = result["memory"]
            print(
                f"  {name} rss: {mem['rss_mib']:.1f} MiB with {mem['allocations']} allocations",
                flush=True,
            )
        for n_allocs in (1, 50) if "relay" in args.only else ():
            for size in (200, 1200):
                key = f"relay_{n_allocs}x{size}"
                result[key] = relay(
                    h, server, n_allocs, size, 0, args.senders, args.warmup, args.window
                )
                print(f"  {name} {key}: {_brief(result[key])}", flush=True)
        for rate in args.paced_rates if "paced" in args.only else ():
            key = f"paced_50x200_{rate}"
            result[key] = relay(h, server, 50, 200, rate, args.senders, args.warmup, args.window)
            print(f"  {name} {key}: {_brief(result[key])}", flush=True)
        if "alloc" in args.only:
            result["alloc_rate"] = allocation_rate(
                h, server, args.alloc_count, args.alloc_batches, args.alloc_window
            )
            ar = result["alloc_rate"]
            print(
                f"  {name} alloc_rate: {ar['allocations_per_s']:.0f}/s"
                f" ({ar['completed']}/{ar['requested']} completed) {' '.join(ar['errors'])}",
                flush=True,
            )
        result["rss_after_mib"] = server.rss_bytes() / 2**20
    finally:
        h.close()
        server.stop()
    result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[0]
    if name.startswith("confedge"):
        result["server_exit_stats"] = _exit_stats(server.log)
        print(f"  {name} exit stats: {result['server_exit_stats']}", flush=True)
    return result


def _exit_stats(log: Path) -> dict[str, Any]:
    """The JSON line `python -m confedge.turn` writes when it stops: relay totals and, for the
    native data plane, its drop counters (where packets were lost, if any were)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith('{"stats"'):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    return {}


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    s = f"offered {r['offered_pps']:.0f}/s delivered {r['delivered_pps']:.0f}/s"
    if r.get("server_cpu_us_per_pkt") is not None:
        s += (
            f", {r['server_cpu_us_per_pkt']:.2f} us CPU/pkt (user {r['server_user_us_per_pkt']:.2f}"
            f" + sys {r['server_sys_us_per_pkt']:.2f}; {r['server_cpu_util']:.2f} cores)"
        )
    if r.get("machine_cpu_us_per_pkt") is not None:
        s += (
            f", machine {r['machine_cpu_us_per_pkt']:.2f} us/pkt"
            f" (server-attributable {r['attributable_cpu_us_per_pkt']:.2f})"
        )
    return s


# (label, path into a round's result, format, higher_is_better)
METRICS: list[tuple[str, tuple[str, ...], str, bool]] = []
for _n in (1, 50):
    for _s in (200, 1200):
        _k = f"relay_{_n}x{_s}"
        METRICS.append(
            (f"delivered pkt/s, {_n} alloc, {_s} B", (_k, "delivered_pps"), "{:,.0f}", True)
        )
        METRICS.append(("  (offered pkt/s)", (_k, "offered_pps"), "{:,.0f}", True))
        METRICS.append(("  dropped % of offered", (_k, "dropped_pct"), "{:.1f}", False))
        METRICS.append(("  server CPU µs/pkt", (_k, "server_cpu_us_per_pkt"), "{:.2f}", False))
        METRICS.append(("    of which user", (_k, "server_user_us_per_pkt"), "{:.2f}", False))
        METRICS.append(("    of which kernel", (_k, "server_sys_us_per_pkt"), "{:.2f}", False))
        METRICS.append(
            ("  whole-machine CPU µs/pkt", (_k, "machine_cpu_us_per_pkt"), "{:.2f}", False)
        )
        METRICS.append(
            (
                "  server-attributable CPU µs/pkt (machine minus generator+sink)",
                (_k, "attributable_cpu_us_per_pkt"),
                "{:.2f}",
                False,
            )
        )
RELAY_ROWS = len(METRICS)
METRICS += [
    ("allocations/s (401 + Allocate)", ("alloc_rate", "allocations_per_s"), "{:,.0f}", True),
    ("  server CPU µs/allocation", ("alloc_rate", "server_cpu_us_per_alloc"), "{:.0f}", False),
    ("  whole machine's busy CPUs meanwhile", ("alloc_rate", "machine_busy_cpus"), "{:.2f}", False),
    (
        "  server's busiest thread, share of a CPU",
        ("alloc_rate", "busiest_thread_cpu"),
        "{:.2f}",
        False,
    ),
    ("RSS idle (MiB)", ("rss_idle_mib",), "{:.1f}", False),
    ("RSS with 1,000 allocations (MiB)", ("memory", "rss_mib"), "{:.1f}", False),
    ("  KiB per allocation (over idle)", ("memory", "rss_kib_per_alloc"), "{:.1f}", False),
    ("RSS after the whole run (MiB)", ("rss_after_mib",), "{:.1f}", False),
]


def _get(r: dict[str, Any], path: tuple[str, ...]) -> float | None:
    cur: Any = r
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return float(cur) if isinstance(cur, int | float) else None


def median_of(rounds: list[dict[str, Any]], path: tuple[str, ...]) -> float | None:
    vals = [v for r in rounds if (v := _get(r, path)) is not None]
    return statistics.median(vals) if vals else None


def paced_metrics(rates: list[int]) -> list[tuple[str, tuple[str, ...], str, bool]]:
    out: list[tuple[str, tuple[str, ...], str, bool]] = []
    for rate in rates:
        key = f"paced_50x200_{rate}"
        label = f"offered {rate:,} pkt/s, 50 alloc, 200 B: delivered"
        out.append((label, (key, "delivered_pps"), "{:,.0f}", True))
        out.append(
            ("  server CPU µs/pkt at that rate", (key, "server_cpu_us_per_pkt"), "{:.2f}", False)
        )
        out.append(("  whole-machine CPU µs/pkt", (key, "machine_cpu_us_per_pkt"), "{:.2f}", False))
        out.append(
            (
                "  server-attributable CPU µs/pkt",
                (key, "attributable_cpu_us_per_pkt"),
                "{:.2f}",
                False,
            )
        )
    return out


def _calib_brief(c: dict[str, float] | str) -> str:
    """One line for a `turnload calib` result (or why there is none)."""
    if isinstance(c, str):
        return f"not measured ({c})"
    return (
        f"a system call {c['syscall_ns'] / 1000:.2f} µs, a 200 B UDP datagram sent and "
        f"received on lo {c['udp_send_recv_ns'] / 1000:.2f} µs"
    )


def table(results: dict[str, list[dict[str, Any]]], paced_rates: list[int]) -> str:
    lines = [
        "| metric (median of rounds) | coturn | confedge | confedge/coturn |",
        "|---|---:|---:|---:|",
    ]
    metrics = METRICS[:RELAY_ROWS] + paced_metrics(paced_rates) + METRICS[RELAY_ROWS:]
    for label, path, fmt, _higher in metrics:
        a = median_of(results.get("coturn", []), path)
        b = median_of(results.get("confedge", []), path)
        ratio = f"{b / a:.2f}" if a and b is not None else "-"
        fa = fmt.format(a) if a is not None else "-"
        fb = fmt.format(b) if b is not None else "-"
        lines.append(f"| {label} | {fa} | {fb} | {ratio} |")
    if results.get(EBPF):
        lines += ["", offload_table(results, metrics)]
    return "\n".join(lines)


EBPF = "confedge-ebpf"


def offload_table(
    results: dict[str, list[dict[str, Any]]], metrics: list[tuple[str, tuple[str, ...], str, bool]]
) -> str:
    """The kernel-offload variant beside coturn and confedge (native), same run (issue 17)."""
    lines = [
        f"| metric (median of rounds) | coturn | confedge | {EBPF} | ebpf/coturn |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, path, fmt, _higher in metrics:
        if path[0] in ("alloc_rate", "memory", "rss_idle_mib", "rss_after_mib"):
            continue
        a, b, c = (median_of(results.get(n, []), path) for n in ("coturn", "confedge", EBPF))
        ratio = f"{c / a:.2f}" if a and c is not None else "-"
        cells = [fmt.format(v) if v is not None else "-" for v in (a, b, c)]
        lines.append(f"| {label} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


NETNS_ENV = "CONFEDGE_TURNBENCH_NETNS"  # set in the re-executed run: it is in its own netns


def _reexec_in_netns(argv: list[str]) -> int:
    """Run this benchmark again inside a private network namespace (--gen-packet).

    Why: frames written into lo with AF_PACKET arrive without the route the output path gives
    loopback packets, so the input route check drops 127.0.0.0/8 as martian, and a packet the
    offload rewrote to come from the relay's (local) address as a local source. The fix is two
    sysctls on lo (route_localnet, accept_local) that must not be changed on the host's lo; a
    namespace of our own (unshare --net, anonymous, gone when the run ends) holds every server,
    the generator and the sink, so all three still meet the same kernel path. The lock and the
    results file are on the shared filesystem as usual.
    """
    if not shutil.which("unshare"):
        print(
            "--gen-packet needs unshare(1) (util-linux) for its network namespace", file=sys.stderr
        )
        return 2
    setup = (
        "ip link set lo up && "
        "sysctl -qw net.ipv4.conf.lo.route_localnet=1 net.ipv4.conf.lo.accept_local=1 && "
        'exec "$@"'
    )
    script = [sys.executable, str(Path(__file__).resolve()), *argv]
    cmd = ["unshare", "--net", "--", "sh", "-c", setup, "sh", *script]
    print("--gen-packet: running in a private network namespace (unshare --net)", flush=True)
    return subprocess.run(cmd, env={**os.environ, NETNS_ENV: "1"}, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1 round, short windows (~1 minute)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="rounds per server (default 3; quick 1)"
    )
    ap.add_argument(
        "--window", type=float, default=None, help="measurement window, s (default 4; quick 1.5)"
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up before the window, s (default 1; quick 0.5)",
    )
    ap.add_argument(
        "--servers",
        default="coturn,confedge",
        help="comma list: coturn, confedge, confedge-ebpf (turn.offload = ebpf: attaches to lo "
        "while it runs, needs root)",
    )
    ap.add_argument(
        "--coturn-threads", type=int, default=2, help="coturn --relay-threads (default 2 = cores)"
    )
    ap.add_argument(
        "--dataplane",
        default=None,
        choices=["auto", "native", "python"],
        help="confedge's turn.dataplane (default: CONFEDGE_DATAPLANE, else auto = native if built)",
    )
    ap.add_argument(
        "--dataplane-threads",
        type=int,
        default=0,
        help="confedge's turn.dataplane_threads (default 0 = one per core, as coturn's 2 here)",
    )
    ap.add_argument(
        "--relay-multiplex",
        type=int,
        default=0,
        help="confedge's turn.relay_multiplex: shared relay sockets per relay address (default 0 "
        "= one port per allocation); implies --spread-peers, for both servers",
    )
    ap.add_argument(
        "--spread-peers",
        action="store_true",
        help="each allocation sends to its own peer address (127.100+w.x.y at the sink's port) "
        "instead of all to 127.0.0.1: shared relay sockets serve a peer address once per socket",
    )
    ap.add_argument("--workers", type=int, default=2, help="load-generator processes (default 2)")
    ap.add_argument(
        "--generator",
        choices=["c", "python"],
        default=None,
        help="relay load: the C sender and sink (bench/turn/turnload.c, built now with the "
        "system compiler) or the Python loop; default c when it builds, else python",
    )
    ap.add_argument(
        "--gen-threads", type=int, default=1, help="threads per C sender process (default 1)"
    )
    ap.add_argument("--sink-threads", type=int, default=1, help="C sink threads (default 1)")
    ap.add_argument(
        "--gen-cpus",
        default="",
        help="comma list of CPUs to pin the C sender and sink threads to (default: no pinning)",
    )
    ap.add_argument(
        "--gen-packet",
        action="store_true",
        help="the C sender writes each allocation's ChannelData as whole Ethernet/IPv4/UDP "
        "frames into lo with an AF_PACKET socket (same 5-tuple, same receive path for every "
        "server) instead of UDP sendmmsg: a cheaper source; needs CAP_NET_RAW",
    )
    ap.add_argument(
        "--senders", type=int, default=1, help="workers that offer relay traffic (default 1)"
    )
    ap.add_argument(
        "--paced-rates",
        default="20000,100000",
        help="comma list of fixed offered pkt/s (50 allocations, 200 B) for the CPU comparison",
    )
    ap.add_argument(
        "--alloc-count",
        type=int,
        default=None,
        help="allocations for the rate test (default 1000; quick 500)",
    )
    ap.add_argument(
        "--alloc-batches",
        type=int,
        default=None,
        help="batches of the rate test (default 20; quick 1)",
    )
    ap.add_argument(
        "--alloc-window",
        type=int,
        default=32,
        help="allocations each load-generator worker keeps in flight in the rate test (default 32)",
    )
    ap.add_argument(
        "--rss-allocs", type=int, default=1000, help="allocations held for the RSS test"
    )
    ap.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help="comma list of scenarios to run (default all): " + ", ".join(SCENARIOS),
    )
    ap.add_argument(
        "--lock-timeout",
        type=float,
        default=3600.0,
        help=f"give up (exit {EXIT_BUSY}) if another run holds the lock this long, s",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=SETTLE,
        help=f"pause after releasing allocations, s (default {SETTLE}: coturn frees ports on a timer)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default bench/results/turn-<time>.json)",
    )
    args = ap.parse_args(argv)
    args.spread_peers = args.spread_peers or args.relay_multiplex > 0
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.window = args.window or (1.5 if args.quick else 4.0)
    args.warmup = args.warmup or (0.5 if args.quick else 1.0)
    args.alloc_count = args.alloc_count or (500 if args.quick else 1000)
    # 20 batches of 1,000: a timed interval of about 1.2 s per round. With 5 (0.3 s) one
    # scheduling hiccup of the shared cores moved a round's rate by 20-30% (paired rounds of the
    # e0f00e6 run: 0.80, 1.18, 1.08 with the server's CPU per allocation below coturn's in two).
    args.alloc_batches = args.alloc_batches or (1 if args.quick else 20)
    try:
        args.paced_rates = [int(r) for r in args.paced_rates.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--paced-rates: {args.paced_rates!r} is not a comma list of integers")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in args.only:
        if s not in SCENARIOS:
            ap.error(f"--only: unknown scenario {s!r} (expected {', '.join(SCENARIOS)})")
    args.c_generator = None
    if args.generator != "python":
        binary, why = cgen.build()
        if binary is not None:
            args.c_generator = CGenerator(
                binary, args.gen_threads, args.sink_threads, args.gen_cpus, args.gen_packet
            )
        elif args.generator == "c":
            ap.error(f"--generator c: {why}")
        else:
            print(f"C load generator unavailable, using the Python one: {why}", flush=True)
    args.generator = "c" if args.c_generator else "python"
    if args.gen_packet and args.c_generator is None:
        ap.error(
            "--gen-packet needs the C generator (turnload.c); it did not build or was not chosen"
        )
    print(f"load generator: {args.generator}", flush=True)
    if args.gen_packet and os.environ.get(NETNS_ENV) != "1":
        return _reexec_in_netns(sys.argv[1:] if argv is None else argv)
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in wanted:
        if s not in ("coturn", "confedge", EBPF):
            ap.error(f"--servers: unknown server {s!r} (expected coturn, confedge, {EBPF})")
    if "coturn" in wanted and not shutil.which("turnserver"):
        ap.error("coturn's turnserver is not installed (apt-get install coturn)")

    # One run at a time on this host: the ports are fixed and two runs would measure each other.
    lock = open("/tmp/confedge-turnbench.lock", "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another TURN benchmark run holds /tmp/confedge-turnbench.lock; waiting", flush=True)
        deadline = time.monotonic() + args.lock_timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print("gave up waiting for the benchmark lock", file=sys.stderr)
                    return EXIT_BUSY
                time.sleep(0.5)

    ctx = mp.get_context("fork")
    work = Path(tempfile.mkdtemp(prefix="confedge-turnbench-"))
    started = time.time()

    # The host's state (turnload calib): measured before and after the rounds.
    calibration: dict[str, Any] = {}
    if args.c_generator is not None:
        calibration["before"] = cgen.calibrate(args.c_generator.binary)
        print(f"host: {_calib_brief(calibration['before'])}", flush=True)

    # Generator ceiling: the same send loop straight into the sink, no server in between.
    h = Harness(ctx, args.workers, args.c_generator)
    ceiling: dict[str, Any] = {}
    try:
        h.spawn(loadgen.Target(("127.0.0.1", 9), "", "", ("127.0.0.1", h.sink_port)))
        for size in (200, 1200) if {"relay", "paced"} & set(args.only) else ():
            ceiling[str(size)] = relay(h, None, 1, size, 0, 1, args.warmup, args.window)
            print(f"generator ceiling {size} B: {_brief(ceiling[str(size)])}", flush=True)
    finally:
        h.close()

    results: dict[str, list[dict[str, Any]]] = {s: [] for s in wanted}
    starters: dict[str, Callable[[], servers.Server]] = {}
    for s in wanted:
        d = work / s
        d.mkdir()
        if s == "coturn":
            starters[s] = functools.partial(servers.start_coturn, COTURN, d, args.coturn_threads)
        else:
            starters[s] = functools.partial(
                servers.start_confedge,
                CONFEDGE,
                d,
                args.dataplane,
                args.dataplane_threads,
                "ebpf" if s == EBPF else "off",
                args.relay_multiplex,
            )
    for rnd in range(args.rounds):
        order = wanted if rnd % 2 == 0 else list(reversed(wanted))
        for s in order:
            print(f"round {rnd + 1}/{args.rounds}: {s}", flush=True)
            results[s].append(run_server(s, starters[s], args, ctx))

    if args.c_generator is not None:
        calibration["after"] = cgen.calibrate(args.c_generator.binary)
    md = table(results, args.paced_rates)
    commit = subprocess.run(
        ["git", "-C", str(servers.REPO), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    turn_dirty = subprocess.run(
        ["git", "-C", str(servers.REPO), "status", "--porcelain", "--", "src/confedge/turn"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    elapsed = time.time() - started
    print()
    print(md)
    print(f"\n{args.rounds} round(s), {elapsed:.0f} s, server logs in {work}")
    for when in ("before", "after"):
        if when in calibration:
            print(f"host {when} the rounds: {_calib_brief(calibration[when])}")
    print(
        f"confedge at {commit}" + (" (src/confedge/turn has local changes)" if turn_dirty else "")
    )
    out = (
        args.out
        or Path(__file__).resolve().parent.parent
        / "results"
        / f"turn-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "argv": sys.argv,
                "args": {k: str(v) for k, v in vars(args).items()},
                "host": {
                    "cpus": mp.cpu_count(),
                    "platform": platform.platform(),
                    "python": sys.version,
                },
                "pythonpath": os.environ.get("PYTHONPATH", ""),  # build/native: compiled
                "elapsed_s": elapsed,
                "generator": args.generator,
                "commit": commit,
                "turn_worktree_changes": turn_dirty,
                "generator_ceiling": ceiling,
                "host_calibration": calibration,
                "results": results,
                "table": md,
            },
            indent=2,
        )
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
