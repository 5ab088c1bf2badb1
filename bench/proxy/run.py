#!/usr/bin/env python3
"""HTTPS proxy benchmark: confedge against nginx configured as the reference configures it.

What runs (all on loopback, on ports free at start within 32000-32767):

* upstreams: one nginx (1 worker, access log off) listening on three ports, answering
  ``/api/client/v2/status`` with a small JSON and anything else with a 1 KB body, so the nodes
  are never the bottleneck;
* reference: nginx with the reference appliance's settings (rp-turn's nginx.conf, proxy-defaults
  and site template: ``worker_processes auto``, TLS 1.2/1.3 with its cipher list,
  ``ssl_ecdh_curve`` (prime256v1 here, the group confedge offers; the reference sets
  secp384r1), the ``pexapplog`` access log with the ``[FILTERED]`` maps,
  ``keepalive 1024`` upstream pool, ``proxy_next_upstream ... non_idempotent``), balancing
  round-robin over the three upstreams, port 80 answering 301;
* confedge: ``confedge run`` with the same three nodes, round-robin, access log to a file.

For each scenario, rounds alternate nginx / confedge (``--rounds`` each, ``--duration`` seconds
each) with ``wrk --latency`` and ``--connections`` keep-alive connections. Reported per server:
requests/s, p50/p99 latency and CPU per request (utime+stime of every process of the server, from
/proc/<pid>/stat, over the run, divided by the requests wrk completed). The median round is shown.

``--sse N`` additionally holds N idle SSE streams through each server (a Python client with
raised RLIMIT_NOFILE; Python upstreams that answer text/event-stream and keep the stream open)
and reports the summed RSS and PSS of the server's processes.

``--perf DIR`` records every process of each server with ``perf record`` during the first round
of each scenario and adds, per scenario, the CPU µs per request by where it ran (kernel, TLS,
libpython, the compiled proxy, uvloop, httptools, nginx's own code, libc): the profile that says
where confedge's CPU per request goes against nginx's.

Results: a JSON file under bench/results/ and a markdown table on standard output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confedge.config import ProxyConfig

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
H2LOAD = shutil.which("h2load") or "/usr/bin/h2load"
CLK_TCK = os.sysconf("SC_CLK_TCK")
H2LOAD_GRACE_S = 20  # h2load -D: seconds past the duration before it counts as hung (run_h2load)

# The listeners' ports; _pick_ports() replaces them with ports free at start in PORT_RANGE, so
# that a run never collides with a demo, the tests or another benchmark.
PORT_RANGE = range(32000, 32768)
UP_PORTS = (32001, 32002, 32003)
SSE_PORTS = (32004, 32005, 32006)
NGX_HTTP, NGX_HTTPS = 32010, 32011
CE_HTTP, CE_HTTPS, CE_MGMT = 32020, 32021, 32022
FL_HTTP, FL_HTTPS = 32030, 32031  # floor.py (--servers ... floor)


def free_ports(n: int, taken: frozenset[int] = frozenset()) -> list[int]:
    """The first `n` ports of PORT_RANGE free now and not in `taken`."""
    free: list[int] = []
    for port in PORT_RANGE:
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        free.append(port)
        if len(free) == n:
            return free
    raise SystemExit(f"fewer than {n} free ports in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")


def _pick_ports() -> None:
    """Choose this run's 13 listener ports among those free now in PORT_RANGE."""
    global UP_PORTS, SSE_PORTS, NGX_HTTP, NGX_HTTPS, CE_HTTP, CE_HTTPS, CE_MGMT, FL_HTTP, FL_HTTPS
    free = free_ports(13)
    UP_PORTS, SSE_PORTS = tuple(free[0:3]), tuple(free[3:6])
    NGX_HTTP, NGX_HTTPS, CE_HTTP, CE_HTTPS, CE_MGMT, FL_HTTP, FL_HTTPS = free[6:13]


CSP_POLICY = ProxyConfig().csp_policy  # confedge's default, the reference's
STATUS_JSON = '{"status": "success", "result": {"version": "bench"}}'
BODY_1K = "x" * 1023 + "\n"

# -- configuration files ----------------------------------------------------------------------

TEMP_PATHS = """
    client_body_temp_path {w}/tmp_body;
    proxy_temp_path {w}/tmp_proxy;
    fastcgi_temp_path {w}/tmp_fcgi;
    uwsgi_temp_path {w}/tmp_uwsgi;
    scgi_temp_path {w}/tmp_scgi;
"""

UPSTREAM_NGINX = """
worker_processes 1;
daemon off;
pid {w}/upstream.pid;
error_log {w}/upstream-error.log;
events {{ worker_connections 4096; }}
http {{
    {temp}
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300;
    default_type text/plain;
    {servers}
}}
"""
UPSTREAM_SERVER = """
    server {{
        listen 127.0.0.1:{port} reuseport;
        location = /api/client/v2/status {{
            default_type application/json;
            return 200 '{status}';
        }}
        location / {{ return 200 '{body}'; }}
    }}
"""

# The reference's secret-filtering maps (rp-turn roles/nginx/files/logging.conf), generated.
_MAPS = "\n".join(
    f"""    map ${src}{"_" + str(i - 1) if i else ""} ${src}{"_" + str(i) if i < 4 else "_filtered"} {{
        ~(.*){name}=[^&\\ \\t\\n]*(.*) $1{name}=[FILTERED]$2;
        default ${src}{"_" + str(i - 1) if i else ""};
    }}"""
    for src in ("request", "http_referer")
    for i, name in enumerate(("code", "state", "token", "pin", "data"))
)

# rp-turn's nginx.conf + proxy-defaults.conf + site template, with paths and ports for the bench.
# Differences, all forced by the bench host: paths under the work dir, worker_rlimit_nofile and
# worker_connections raised to fit --sse streams (the reference's 8192 per worker would cap it),
# round-robin instead of the template's ip_hash (wrk comes from one address: ip_hash would send
# everything to one node), http2 on the TLS listener (the h2-* scenarios; wrk offers no ALPN, so
# the wrk scenarios stay on HTTP/1.1 exactly as before), and ssl_ecdh_curve prime256v1 instead of
# secp384r1: confedge offers P-256 only (tls/context.py), so both servers negotiate the same
# protocol, cipher and key-exchange group (TLS 1.3, TLS_AES_256_GCM_SHA384, P-256) in the bench.
REFERENCE_NGINX = """
worker_processes auto;
daemon off;
pid {w}/nginx.pid;
worker_rlimit_nofile 20000;
error_log {w}/nginx-error.log;
events {{ worker_connections {worker_connections}; }}
http {{
    {temp}
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 10000000;
    types_hash_max_size 2048;
    default_type application/octet-stream;
    client_max_body_size 15M;
    charset UTF-8;
    gzip on;
{maps}
    # SPEC §2: the reference adds its Content-Security-Policy when the node sent none.
    map $upstream_http_content_security_policy $csp_added {{
        "" "{csp}";
        default "";
    }}
    add_header Content-Security-Policy $csp_added always;
    log_format pexapplog '$remote_addr - $remote_user [$time_local]  '
                         '"$request_filtered" $status $body_bytes_sent '
                         '"$http_referer_filtered" "$http_user_agent" '
                         '"$upstream_addr" "$upstream_status" "$upstream_response_time"';
    access_log {w}/nginx-access.log pexapplog;

    upstream pexip {{
        {upstreams}
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{http_port} default_server;
        return 301 https://$host$request_uri;
    }}
    server {{
        listen 127.0.0.1:{https_port} ssl http2 default_server;
        ssl_certificate {w}/cert.pem;
        ssl_certificate_key {w}/key.pem;
        ssl_session_timeout 5m;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers !eNULL:!EXP:!DES:!3DES:!RC4:!RC2:!IDEA:!CAMELLIA:!SEED:!MD5:!aNULL:!ADH:!SRP:!PSK:EECDH+AESGCM:EDH+AESGCM;
        ssl_ecdh_curve prime256v1;
        ssl_prefer_server_ciphers on;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets off;

        proxy_ssl_server_name on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_redirect off;
        proxy_connect_timeout 3s;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_next_upstream http_500 http_502 http_503 http_504 error timeout non_idempotent;
        proxy_read_timeout 3600s;

        location / {{ proxy_pass http://pexip; }}
        location /api {{ proxy_pass http://pexip; proxy_connect_timeout 20s; }}
    }}
}}
"""


def confedge_toml(w: Path, nodes: tuple[int, ...], workers: int) -> str:
    node_list = ", ".join(f'"http://127.0.0.1:{p}"' for p in nodes)
    return f"""
[server]
state_dir = "{w}/state"

[proxy]
https_port = {CE_HTTPS}
http_port = {CE_HTTP}
nodes = [{node_list}]
balance = "round-robin"
workers = {workers}
access_log = "{w}/confedge-access.log"
max_connections = 30000

[turn]
enabled = false

[guard]
enabled = false

[tls]
cert = "{w}/cert.pem"
key = "{w}/key.pem"

[management]
port = {CE_MGMT}
"""


# -- processes --------------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; see the work dir logs")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port} within {timeout} s")


def _start(cmd: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (workers, the multiprocessing resource tracker...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, kernel) CPU seconds of the process tree (utime and stime, fields 14 and 15 of
    /proc/<pid>/stat). Kept apart because the two servers' kernel work is nearly the same
    system calls, so the gap between them is mostly on the user side."""
    user = kernel = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        kernel += int(fields[12])
    return user / CLK_TCK, kernel / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime+stime of the process tree."""
    return sum(cpu_times(pid))


def _cpu_fields(
    start: tuple[float, float], end: tuple[float, float], requests: int
) -> dict[str, Any]:
    """cpu_s and cpu_us_per_req, plus the user and kernel shares per request."""
    user, kernel = end[0] - start[0], end[1] - start[1]
    cpu = user + kernel

    def per(x: float) -> float | None:
        return round(x / requests * 1e6, 2) if requests else None

    return {
        "cpu_s": round(cpu, 3),
        "cpu_us_per_req": per(cpu),
        "cpu_user_us_per_req": per(user),
        "cpu_kernel_us_per_req": per(kernel),
    }


def memory_kib(pid: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, process count) of the tree, from smaps_rollup."""
    rss = pss = n = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                text = f.read()
        except OSError:
            continue
        n += 1
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss, n


class Servers:
    """The upstream nginx, the reference nginx and confedge, started on demand."""

    def __init__(
        self, work: Path, workers: int, worker_connections: int, native: Path | None = None
    ) -> None:
        self.w = work
        self.workers = workers
        self.worker_connections = worker_connections
        self.native = native  # a compiled build (build_compiled) to put first on PYTHONPATH
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start_upstreams(self) -> None:
        servers = "".join(
            UPSTREAM_SERVER.format(port=p, status=STATUS_JSON, body=BODY_1K) for p in UP_PORTS
        )
        conf = self.w / "upstream.conf"
        conf.write_text(
            UPSTREAM_NGINX.format(w=self.w, temp=TEMP_PATHS.format(w=self.w), servers=servers)
        )
        proc = _start([NGINX, "-c", str(conf), "-p", str(self.w)], self.w / "upstream.out")
        self.procs["upstreams"] = proc
        for p in UP_PORTS:
            _wait_port(p, proc, "upstream nginx")

    def start_sse_upstreams(self) -> None:
        proc = _start(
            [sys.executable, __file__, "--role", "sse-upstream", "--ports", _csv(SSE_PORTS)],
            self.w / "sse-upstream.out",
            preexec_fn=_raise_nofile,
        )
        self.procs["sse-upstreams"] = proc
        for p in SSE_PORTS:
            _wait_port(p, proc, "SSE upstream")

    def start_nginx(self, nodes: tuple[int, ...]) -> subprocess.Popen[bytes]:
        conf = self.w / "nginx.conf"
        conf.write_text(
            REFERENCE_NGINX.format(
                w=self.w,
                temp=TEMP_PATHS.format(w=self.w),
                maps=_MAPS,
                csp=CSP_POLICY,
                upstreams="\n        ".join(
                    f"server 127.0.0.1:{p} weight=1 max_fails=0;" for p in nodes
                ),
                http_port=NGX_HTTP,
                https_port=NGX_HTTPS,
                worker_connections=self.worker_connections,
            )
        )
        proc = _start([NGINX, "-c", str(conf), "-p", str(self.w)], self.w / "nginx.out")
        self.procs["nginx"] = proc
        _wait_port(NGX_HTTPS, proc, "reference nginx")
        return proc

    def start_confedge(self, nodes: tuple[int, ...]) -> subprocess.Popen[bytes]:
        conf = self.w / "confedge.toml"
        conf.write_text(confedge_toml(self.w, nodes, self.workers))
        (self.w / "state").mkdir(exist_ok=True)
        exe = VENV_BIN / "confedge"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "confedge.cli"]
        env = None
        if self.native is not None:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.native), env.get("PYTHONPATH", "")) if p
            )
        proc = _start(
            [*cmd, "run", "--config", str(conf)],
            self.w / "confedge.out",
            preexec_fn=_raise_nofile,
            env=env,
        )
        self.procs["confedge"] = proc
        _wait_port(CE_HTTPS, proc, "confedge")
        time.sleep(1.0)  # let every worker bind and the first health checks pass
        return proc

    def start_floor(self, nodes: tuple[int, ...]) -> subprocess.Popen[bytes]:
        """floor.py: the uvloop + TLS stack with no HTTP handling, as many workers as
        confedge (its figure is what confedge's HTTP code costs above, see floor.py)."""
        env = dict(os.environ)
        if self.native is not None:  # the same confedge (for its TLS context) as the run's
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.native), env.get("PYTHONPATH", "")) if p
            )
        proc = _start(
            [
                sys.executable,
                str(Path(__file__).with_name("floor.py")),
                f"--cert={self.w / 'cert.pem'}",
                f"--key={self.w / 'key.pem'}",
                f"--https-port={FL_HTTPS}",
                f"--http-port={FL_HTTP}",
                f"--nodes={_csv(nodes)}",
                f"--workers={self.workers}",
            ],
            self.w / "floor.out",
            preexec_fn=_raise_nofile,
            env=env,
        )
        self.procs["floor"] = proc
        _wait_port(FL_HTTPS, proc, "floor")
        time.sleep(0.5)  # every worker's listeners
        return proc

    def stop(self, name: str) -> None:
        _stop(self.procs.pop(name, None))

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_cert(w: Path) -> None:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            "-subj", "/CN=edge.localdomain", "-addext", "subjectAltName=DNS:edge.localdomain,IP:127.0.0.1",
            "-keyout", str(w / "key.pem"), "-out", str(w / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


# -- wrk --------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def run_wrk(url: str, duration: int, connections: int, threads: int, pid: int) -> dict[str, Any]:
    cpu0 = cpu_times(pid)
    out = subprocess.run(
        [WRK, "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    cpu1 = cpu_times(pid)
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out)[1])  # type: ignore[index]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out)[1])  # type: ignore[index]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": requests,
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        **_cpu_fields(cpu0, cpu1, requests),
        "non_2xx_3xx": int(bad[1]) if bad else 0,
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
    }


def run_h2load(
    url: str, duration: int, connections: int, threads: int, pid: int, streams: int = 10
) -> dict[str, Any]:
    """h2load (nghttp2-client) over TLS with ALPN h2: `connections` clients with up to `streams`
    requests in flight each. p50/p99 come from its per-request log (h2load itself prints only
    mean and sd); the same fields as run_wrk."""
    argv = [
        H2LOAD, "-t", str(threads), "-c", str(connections), "-m", str(streams),
        "-D", str(duration),
    ]  # fmt: skip
    hangs: list[str] = []
    for _attempt in range(2):
        with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".tsv") as logf:
            cpu0 = cpu_times(pid)
            try:
                out = subprocess.run(
                    [*argv, "--log-file", logf.name, url],
                    capture_output=True,
                    text=True,
                    timeout=duration + H2LOAD_GRACE_S,
                    check=True,
                ).stdout
            except subprocess.TimeoutExpired:
                # h2load in duration mode can wait for ever after its duration (CI met it
                # twice in 60-odd runs against confedge under load; its -N has no effect
                # with -D, nghttp2 issue 1960): what the sockets looked like, then once more.
                hangs.append(_sockets_of(url))
                print(f"  h2load hung on {url}; sockets: {hangs[-1]}; again", file=sys.stderr)
                continue
            cpu1 = cpu_times(pid)
            rows = [line.split("\t") for line in Path(logf.name).read_text().splitlines() if line]
            break
    else:
        raise SystemExit(f"h2load hung twice on {url}; sockets: {hangs}")
    if "Application protocol: h2" not in out:
        raise SystemExit(f"h2load did not negotiate h2 with {url}:\n{out}")
    m = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    assert m is not None, out
    done, _ok, failed, errored, timeouts = (int(x) for x in m.groups())
    if timeouts:
        # A request h2load gave up on: a failure of the server under test, said as one
        # (which server, how many), not a throughput figure.
        raise SystemExit(f"h2load: {timeouts} request(s) to {url} timed out:\n{out}")
    rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)[1])  # type: ignore[index]
    durations = sorted(int(r[2]) for r in rows if len(r) >= 3 and r[1] != "-1")
    status_bad = sum(1 for r in rows if len(r) >= 2 and not ("200" <= r[1] < "400"))

    def pct(q: float) -> float:
        return (
            durations[min(len(durations) - 1, int(q * len(durations)))] / 1000 if durations else 0
        )

    return {
        "requests": done,
        "rps": rps,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        **_cpu_fields(cpu0, cpu1, done),
        "non_2xx_3xx": status_bad,
        "socket_errors": failed + errored + timeouts,
        **({"h2load_hangs": hangs} if hangs else {}),
    }


def _sockets_of(url: str) -> str:
    """TCP sockets to or from `url`'s port, counted by state (`ss`), for a hang's report."""
    port = url.split(":")[2].split("/")[0]
    try:
        lines = subprocess.run(
            ["ss", "-tanH", f"( sport = :{port} or dport = :{port} )"],
            capture_output=True, text=True, timeout=10,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ss failed: {exc}"
    states: dict[str, int] = {}
    for line in lines:
        state = line.split(None, 1)[0] if line.strip() else "?"
        states[state] = states.get(state, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"


SCENARIOS = {
    # name: (scheme, path, description)
    "https-status": (
        "https",
        "/api/client/v2/status",
        "TLS, GET /api/client/v2/status (small JSON)",
    ),
    "https-1k": ("https", "/webapp/home", "TLS, GET /webapp/home (1 KB body)"),
    "http-redirect": ("http", "/webapp/home", "plain HTTP port: 301 to https (no upstream)"),
    # HTTP/2 to the client (ALPN h2), HTTP/1.1 to the nodes; h2load, 10 streams per connection.
    "h2-status": ("h2", "/api/client/v2/status", "TLS + HTTP/2 (h2load), GET status"),
    "h2-1k": ("h2", "/webapp/home", "TLS + HTTP/2 (h2load), GET /webapp/home (1 KB body)"),
}


def _load(scheme: str, http: int, https: int, path: str) -> tuple[Any, str]:
    """The load tool and URL for a scenario's scheme (h2: h2load over https)."""
    if scheme == "h2":
        return run_h2load, f"https://127.0.0.1:{https}{path}"
    port = https if scheme == "https" else http
    return run_wrk, f"{scheme}://127.0.0.1:{port}{path}"


def bench_throughput(s: Servers, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    s.start_upstreams()
    ports: dict[str, tuple[int, int, int]] = {}
    if "nginx" in args.servers:
        ports["nginx"] = (NGX_HTTP, NGX_HTTPS, s.start_nginx(UP_PORTS).pid)
    if "confedge" in args.servers:
        ports["confedge"] = (CE_HTTP, CE_HTTPS, s.start_confedge(UP_PORTS).pid)
    if "floor" in args.servers:
        ports["floor"] = (FL_HTTP, FL_HTTPS, s.start_floor(UP_PORTS).pid)
    try:
        for name in args.scenarios:
            scheme, path, _ = SCENARIOS[name]
            # floor.py speaks no HTTP/2: it measures the HTTP/1.1 scenarios only.
            servers = [srv for srv in ports if not (srv == "floor" and scheme == "h2")]
            runs: dict[str, list[dict[str, Any]]] = {srv: [] for srv in servers}
            for server in servers:  # warm-up: pools, TLS sessions, caches
                http, https, pid = ports[server]
                tool, url = _load(scheme, http, https, path)
                tool(url, min(2, args.duration), args.connections, args.threads, pid)
            for rnd in range(args.rounds):
                order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
                for server in order:
                    http, https, pid = ports[server]
                    tool, url = _load(scheme, http, https, path)
                    spy = perf = None
                    if args.profile and server == "confedge" and rnd == 0:
                        spy = _start_profile(args.profile, name, pid, args.duration)
                    if args.perf and rnd == 0:
                        perf = _start_perf(args.perf, f"{name}-{server}", pid, args.duration)
                    r = tool(
                        url,
                        args.duration,
                        args.connections,
                        args.threads,
                        pid,
                    )
                    if spy is not None:
                        spy.wait(30)
                    if perf is not None:
                        perf.wait(60)
                        r["perf_us_per_req"] = summarize_perf(
                            args.perf / f"{name}-{server}.data", r["requests"]
                        )
                    runs[server].append(r)
                    print(f"  {name} round {rnd + 1} {server}: {r}", file=sys.stderr)
            results[name] = {srv: {"runs": rs, "median": _median(rs)} for srv, rs in runs.items()}
    finally:
        s.stop("floor")
        s.stop("confedge")
        s.stop("nginx")
        s.stop("upstreams")
    return results


def _start_profile(out: Path, name: str, pid: int, duration: int) -> subprocess.Popen[bytes]:
    """py-spy on one confedge worker (the first child with a Python stack) for one round."""
    py_spy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    kids = [p for p in _tree(pid) if p != pid] or [pid]
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [py_spy, "record", "--nonblocking", "-r", "250", "-d", str(duration), "-f", "raw",
         "-o", str(out / f"{name}.txt"), "-p", str(kids[0])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


PERF_HZ = 2000

# Where a server's CPU goes, by the shared object a perf sample landed in: the buckets of
# docs/BENCHMARKS.md "CPU per request toward nginx's" (first match wins).
PERF_BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernel", ("[kernel", "[unknown]")),
    ("TLS (libcrypto, libssl, _ssl)", ("libcrypto", "libssl", "_ssl.")),
    ("libpython", ("libpython",)),
    ("compiled proxy (mypyc)", ("__mypyc",)),
    ("uvloop", ("uvloop", "loop.cpython")),
    ("httptools", ("httptools", "parser.cpython", "url_parser")),
    ("nginx", ("nginx",)),
    ("libc, vdso, pcre", ("libc.", "libc-", "[vdso]", "libpcre", "ld-linux", "libm.")),
)


def _start_perf(out: Path, name: str, pid: int, duration: int) -> subprocess.Popen[bytes]:
    """`perf record` on every process of one server (master and workers) for one round."""
    out.mkdir(parents=True, exist_ok=True)
    pids = ",".join(str(p) for p in _tree(pid))
    return subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(PERF_HZ), "-p", pids,
         "-o", str(out / f"{name}.data"), "--", "sleep", str(duration)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def summarize_perf(path: Path, requests: int) -> dict[str, float]:
    """CPU µs per request by bucket (PERF_BUCKETS) from a `_start_perf` recording: samples in
    the bucket / PERF_HZ / requests the load tool completed in the same window."""
    report = subprocess.run(
        ["perf", "report", "-i", str(path), "--stdio", "-n", "--sort", "dso", "-g", "none"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    out: dict[str, float] = {}
    for line in report.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(.+?)\s*$", line)
        if m is None:
            continue
        dso = m[2]
        bucket = next((b for b, keys in PERF_BUCKETS if any(k in dso for k in keys)), "other")
        us = int(m[1]) / PERF_HZ / requests * 1e6 if requests else 0.0
        out[bucket] = out.get(bucket, 0.0) + us
    out["total"] = sum(out.values())
    return {k: round(v, 2) for k, v in out.items()}


def perf_table(profiles: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: per scenario, µs per request by bucket for each server."""
    lines = []
    for scenario, by_server in profiles.items():
        servers = list(by_server)
        lines += [f"\nperf, {scenario}: CPU µs per request by where it ran", "",
                  "| | " + " | ".join(servers) + " |", "|---|" + "---:|" * len(servers)]  # fmt: skip
        buckets = [b for b, _ in PERF_BUCKETS] + ["other", "total"]
        for b in buckets:
            if any(b in by_server[srv] for srv in servers):
                cells = [f"{by_server[srv].get(b, 0.0):.1f}" for srv in servers]
                lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize_profile(path: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n_s = line.rpartition(" ")
        n = int(n_s)
        total += n
        frames = [re.sub(r" \((.*/)?([^/]+):\d+\)", r" (\2)", f) for f in stack.split(";")]
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    lines = [f"{path.name}: {total} samples", "self%  function"]
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / total:5.1f}  {f}")
    lines.append("incl%  function")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / total:5.1f}  {f}")
    return "\n".join(lines)


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")
    split = ("cpu_user_us_per_req", "cpu_kernel_us_per_req")
    return (
        {k: round(statistics.median(r[k] for r in runs if r[k] is not None), 3) for k in keys}
        | {
            # the user/kernel split of the round whose CPU is the median (so they add up)
            k: sorted(runs, key=lambda r: r["cpu_us_per_req"] or 0)[len(runs) // 2].get(k)
            for k in split
        }
        | {
            "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in runs),
            "socket_errors": sum(r["socket_errors"] for r in runs),
        }
    )


# -- SSE memory -------------------------------------------------------------------------------


def _csv(ports: tuple[int, ...]) -> str:
    return ",".join(str(p) for p in ports)


async def _sse_upstream_main(ports: list[int]) -> None:
    """Three ports; /api/client/v2/status answers 200, anything else opens an SSE stream."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                target = head.split(b" ", 2)[1] if b" " in head else b""
                if target.startswith(b"/api/client/v2/status"):
                    body = STATUS_JSON.encode()
                    self.t.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body
                    )  # fmt: skip
                else:
                    ev = b"event: hello\ndata: {}\n\n"
                    self.t.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"
                        + f"{len(ev):x}\r\n".encode() + ev + b"\r\n"
                    )  # fmt: skip

    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(Proto, "127.0.0.1", p, backlog=4096, reuse_address=True)
        for p in ports
    ]
    try:
        await asyncio.Event().wait()
    finally:
        for srv in servers:
            srv.close()


async def _sse_client_main(port: int, count: int, hold: float) -> None:
    """Open `count` TLS SSE streams, print READY when each has its first event, then hold."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    done = 0
    failed = 0

    class Proto(asyncio.Protocol):
        def __init__(self, fut: asyncio.Future[bool]) -> None:
            self.fut = fut
            self.buf = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(  # type: ignore[attr-defined]
                b"GET /api/client/v2/conferences/bench/events?token=t HTTP/1.1\r\n"
                b"Host: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
            )

        def data_received(self, data: bytes) -> None:
            if self.fut.done():
                return  # keep nothing: the stream is idle after its first event
            self.buf += data
            if b"data:" in self.buf:
                self.fut.set_result(b" 200 " in self.buf.split(b"\r\n", 1)[0])
                self.buf = b""

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.fut.done():
                self.fut.set_result(False)

    transports = []

    async def one() -> None:
        nonlocal done, failed
        fut: asyncio.Future[bool] = loop.create_future()
        try:
            t, _ = await asyncio.wait_for(
                loop.create_connection(lambda: Proto(fut), "127.0.0.1", port, ssl=ctx), 30
            )
            transports.append(t)
            ok = await asyncio.wait_for(fut, 30)
        except (OSError, TimeoutError):
            ok = False
        if ok:
            done += 1
        else:
            failed += 1

    batch = 250
    for i in range(0, count, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, count - i))))
    print(f"READY {done} {failed}", flush=True)
    await asyncio.sleep(hold)
    for t in transports:
        t.close()


def bench_sse(s: Servers, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    s.start_sse_upstreams()
    try:
        for server in ("confedge", "nginx"):
            if (server == "nginx" and not args.sse_nginx) or server not in args.servers:
                continue
            if server == "nginx":
                proc, port = s.start_nginx(SSE_PORTS), NGX_HTTPS
            else:
                proc, port = s.start_confedge(SSE_PORTS), CE_HTTPS
            idle = memory_kib(proc.pid)
            client = subprocess.Popen(
                [sys.executable, __file__, "--role", "sse-client", "--port", str(port),
                 "--count", str(args.sse), "--hold", "600"],
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=_raise_nofile,
                start_new_session=True,
            )  # fmt: skip
            try:
                assert client.stdout is not None
                t0 = time.monotonic()
                line = client.stdout.readline().split()
                took = time.monotonic() - t0
                if not line or line[0] != "READY":
                    raise SystemExit(f"SSE client failed against {server}")
                ok, failed = int(line[1]), int(line[2])
                time.sleep(2.0)  # let allocator and buffers settle
                rss, pss, nproc = memory_kib(proc.pid)
                out[server] = {
                    "streams": ok,
                    "failed": failed,
                    "open_seconds": round(took, 1),
                    "idle_rss_mib": round(idle[0] / 1024, 1),
                    "rss_mib": round(rss / 1024, 1),
                    "pss_mib": round(pss / 1024, 1),
                    "processes": nproc,
                    "kib_per_stream": round((pss - idle[1]) / ok, 1) if ok else None,
                }
                print(f"  sse {server}: {out[server]}", file=sys.stderr)
            finally:
                _stop(client)  # type: ignore[arg-type]
                s.stop(server)
    finally:
        s.stop("sse-upstreams")
    return out


# -- report -----------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if results.get("build"):
        lines += [f"confedge's proxy hot path: {results['build']}.", ""]
    if results.get("throughput"):
        lines += [
            "| scenario | server | req/s | p50 ms | p99 ms | CPU µs/req | user / kernel | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
    ratios = []
    floor_runs = any("floor" in per for per in results.get("throughput", {}).values())
    for name, per in results.get("throughput", {}).items():
        for server in per:
            m = per[server]["median"]
            u, k = m.get("cpu_user_us_per_req"), m.get("cpu_kernel_us_per_req")
            split = f"{u:.1f} / {k:.1f}" if u is not None and k is not None else "-"
            lines.append(
                f"| {name} | {server} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                f"{m['cpu_us_per_req']:.1f} | {split} | {m['non_2xx_3xx'] + m['socket_errors']} |"
            )
        if "nginx" not in per or "confedge" not in per:
            continue
        n, c = per["nginx"]["median"], per["confedge"]["median"]
        ratio = (
            f"| {name} | {c['rps'] / n['rps']:.2f} | {c['p99_ms'] / n['p99_ms']:.2f} | "
            f"{c['cpu_us_per_req'] / n['cpu_us_per_req']:.2f} |"
        )
        if floor_runs:
            f = per.get("floor", {}).get("median")
            ratio += (
                f" {f['cpu_us_per_req'] / n['cpu_us_per_req']:.2f} |"
                f" {c['cpu_us_per_req'] - f['cpu_us_per_req']:.1f} |"
                if f
                else " - | - |"
            )
        ratios.append(ratio)
    if ratios:
        head = "| scenario | req/s confedge/nginx | p99 confedge/nginx | CPU per request confedge/nginx |"
        rule = "|---|---:|---:|---:|"
        if floor_runs:  # floor.py: the stack's own cost, and confedge's HTTP work above it
            head += " CPU floor/nginx | confedge - floor, µs/req |"
            rule += "---:|---:|"
        lines += ["", head, rule, *ratios]
    sse = results.get("sse")
    if sse:
        lines += [
            "",
            "| idle SSE streams | server | streams open | RSS MiB (sum) | PSS MiB (sum) | idle PSS→ KiB/stream | processes |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for server, r in sse.items():
            lines.append(
                f"| {results['args']['sse']} | {server} | {r['streams']} (failed {r['failed']}) | "
                f"{r['rss_mib']} | {r['pss_mib']} | {r['kib_per_stream']} | {r['processes']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per server and scenario")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--workers", type=int, default=0, help="confedge proxy.workers (0 = per core)")
    ap.add_argument(
        "--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS), metavar="NAME"
    )
    ap.add_argument("--sse", type=int, default=10000, help="idle SSE streams to hold (0 = skip)")
    ap.add_argument("--sse-nginx", action="store_true", help="also hold the SSE streams via nginx")
    ap.add_argument(
        "--servers", nargs="*", default=["nginx", "confedge"],
        choices=["nginx", "confedge", "floor"],
        help="floor: bench/proxy/floor.py, the uvloop + TLS stack without HTTP handling "
        "(HTTP/1.1 scenarios only): what confedge's HTTP code costs above it",
    )  # fmt: skip
    ap.add_argument("--no-throughput", action="store_true", help="only the SSE memory part")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    ap.add_argument(
        "--build", choices=["compiled", "interpreted"], default="compiled",
        help="compiled: the wheel build `pip install .` makes (setup.py compiles the hot path "
        "with mypyc), built into the work dir; interpreted: this source tree as it is",
    )  # fmt: skip
    ap.add_argument(
        "--profile", type=Path, default=None, metavar="DIR",
        help="py-spy one confedge worker during the first round of each scenario (needs py-spy)",
    )  # fmt: skip
    ap.add_argument(
        "--perf", type=Path, default=None, metavar="DIR",
        help="perf record every process of each server during the first round of each scenario "
        "and report CPU µs per request by where it ran (kernel, TLS, libpython, ...)",
    )  # fmt: skip
    # Internal roles: the same file runs the SSE upstreams and the SSE client as subprocesses.
    ap.add_argument("--role", choices=["sse-upstream", "sse-client"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ports", default="", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hold", type=float, default=600, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.role == "sse-upstream":
        asyncio.run(_sse_upstream_main([int(p) for p in args.ports.split(",")]))
        return 0
    if args.role == "sse-client":
        asyncio.run(_sse_client_main(args.port, args.count, args.hold))
        return 0

    for tool in (NGINX, WRK):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} is missing: apt-get install nginx wrk")
    _pick_ports()
    work = Path(tempfile.mkdtemp(prefix="confedge-bench-proxy-"))
    make_cert(work)
    native = build_compiled(work / "native") if args.build == "compiled" else None
    servers = Servers(
        work,
        args.workers,
        worker_connections=min(19000, max(8192, args.sse * 2 + 1024)),
        native=native,
    )
    results: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": {
            "cpus": os.cpu_count(),
            "nginx": _nginx_version(),
            "python": sys.version.split()[0],
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build": build_kind(native),
    }
    try:
        if not args.no_throughput:
            results["throughput"] = bench_throughput(servers, args)
        if args.sse:
            results["sse"] = bench_sse(servers, args)
    finally:
        servers.stop_all()
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    out = args.out or ROOT / "bench" / "results" / f"proxy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    if args.perf and "throughput" in results:
        profiles = {
            name: {srv: r["runs"][0]["perf_us_per_req"] for srv, r in by_server.items()}
            for name, by_server in results["throughput"].items()
        }
        print(perf_table(profiles))
    if args.profile:
        for f in sorted(args.profile.glob("*.txt")):
            print("\n" + summarize_profile(f), file=sys.stderr)
    print(f"\nresults: {out}", file=sys.stderr)
    return 0


def build_compiled(out: Path) -> Path:
    """Install this tree as a wheel install would (mypyc-compiled hot path) into `out`."""
    t0 = time.monotonic()
    # setuptools' staging area, as `make native` clears it: a module dropped from the compiled
    # list would otherwise come back from it as a stale .so that imports a missing symbol.
    for staged in ROOT.glob("build/lib.*"):
        shutil.rmtree(staged)
    proc = subprocess.run(
        [str(VENV_BIN / "pip"), "install", "--quiet", "--no-build-isolation", "--no-deps",
         "--target", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "CONFEDGE_PURE": "0"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"building the compiled confedge failed:\n{proc.stderr[-4000:]}")
    if build_kind(out) != "compiled (mypyc)":
        raise SystemExit(f"the build in {out} is not compiled (no C compiler?): {proc.stderr}")
    print(f"compiled build ready in {time.monotonic() - t0:.0f} s: {out}", file=sys.stderr)
    return out


def build_kind(path: Path | None) -> str:
    """What confedge.proxy.build_kind() says with `path` first on PYTHONPATH."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return subprocess.run(
        [sys.executable, "-c", "from confedge.proxy import build_kind; print(build_kind())"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip


def _nginx_version() -> str:
    r = subprocess.run([NGINX, "-v"], capture_output=True, text=True, check=False)
    return r.stderr.strip().split("/")[-1]


if __name__ == "__main__":
    sys.exit(main())
