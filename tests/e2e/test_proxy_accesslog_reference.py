"""The access log against the real reference tools: nginx's own log line and fail2ban-regex.

Two checks that the line is the reference's, not merely similar to it:

* nginx (Debian's) is run with the reference's ``log_format pexapplog`` and its ``[FILTERED]``
  maps; the same raw requests go to it, and ``format_line`` fed with the same inputs must
  reproduce nginx's lines byte for byte (escaping, dashes, filtering, time).
* ``fail2ban-regex`` with the reference's PIN brute-force filter (``pexiprp.conf`` of Pexip's
  rp-turn appliance) must find the client address in a confedge line for a 403 on
  ``request_token`` and must not match a 200.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from confedge.proxy.accesslog import TimeLocal, format_line, request_line
from ports import free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FAIL2BAN_REGEX = shutil.which("fail2ban-regex")

# The reference's filter (github.com/pexip/rp-turn files/etc/fail2ban/filter.d/pexiprp.conf):
# the failregex and datepattern are the interface being tested, so they are reproduced as is.
PEXIPRP_CONF = r"""[INCLUDES]
before = common.conf

[Definition]
failregex = ^<HOST> - - .*  "POST /api/client/v2/conferences/.*/request_token HTTP/.*" 403 .* ".*" ".*" ".*" "403" ".*"$
ignoreregex =
datepattern = %%d(?P<_sep>[-/])%%b(?P=_sep)%%ExY[ :]?%%H:%%M:%%S(?:\.%%f)?(?: %%z)?
"""

# The reference's nginx log format and its secret-filtering maps (roles/nginx/files/logging.conf
# and nginx.conf of rp-turn), in the reference's shape.
_MAPS = "\n".join(
    f"""map ${src}{"_" + str(i - 1) if i else ""} ${src}{"_" + str(i) if i < 4 else "_filtered"} {{
    ~(.*){name}=[^&\\ \\t\\n]*(.*) $1{name}=[FILTERED]$2;
    default ${src}{"_" + str(i - 1) if i else ""};
}}"""
    for src in ("request", "http_referer")
    for i, name in enumerate(("code", "state", "token", "pin", "data"))
)

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {maps}
    log_format pexapplog '$remote_addr - $remote_user [$time_local]  '
                         '"$request_filtered" $status $body_bytes_sent '
                         '"$http_referer_filtered" "$http_user_agent" '
                         '"$upstream_addr" "$upstream_status" "$upstream_response_time"';
    access_log {tmp}/access.log pexapplog;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 403 "forbidden\\n"; }}
    }}
}}
"""


@contextlib.contextmanager
def _nginx(tmp: Path) -> Iterator[int]:
    try:
        port = free_port(32100, 32199)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, maps=_MAPS))
    proc = subprocess.Popen(
        [NGINX, "-c", str(conf), "-p", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"nginx did not start: {err}")
            time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def _raw_request(port: int, raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        while s.recv(4096):
            pass


# (request line, referer or None, user agent or None); bytes as they go on the wire.
CASES: list[tuple[bytes, bytes | None, bytes | None]] = [
    (
        b"POST /api/client/v2/conferences/vmr.fred@example.com/request_token HTTP/1.1",
        b"https://192.168.1.206/webapp/",
        b"Mozilla/5.0 (X11; Linux x86_64) Chrome/52.0",
    ),
    (b"GET /webapp/?conference=x&pin=1234 HTTP/1.1", None, None),
    (
        b"GET /oauth/cb?code=AAA&state=BBB&token=CCC&data=DDD HTTP/1.1",
        b"https://idp.example/?pin=9999&x=1",
        b'quote " backslash \\ caf\xc3\xa9 \x7f ctl',
    ),
    (b"GET /caf%C3%A9?q=%22 HTTP/1.0", b"", b"curl/8.0"),
]


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
def test_line_is_byte_identical_to_nginx(tmp_path: Path) -> None:
    with _nginx(tmp_path) as port:
        for line, referer, ua in CASES:
            raw = line + b"\r\nHost: edge\r\nConnection: close\r\n"
            if referer is not None:
                raw += b"Referer: " + referer + b"\r\n"
            if ua is not None:
                raw += b"User-Agent: " + ua + b"\r\n"
            if line.startswith(b"POST"):
                raw += b"Content-Length: 0\r\n"
            _raw_request(port, raw + b"\r\n")
        deadline = time.monotonic() + 5
        log = tmp_path / "access.log"
        while len(log.read_bytes().splitlines()) < len(CASES) and time.monotonic() < deadline:
            time.sleep(0.02)
    nginx_lines = log.read_bytes().decode("ascii").splitlines()
    assert len(nginx_lines) == len(CASES)
    time_local = TimeLocal()  # nginx logs local time: same process environment, same zone
    for nginx_line, (line, referer, ua) in zip(nginx_lines, CASES, strict=True):
        stamp = nginx_line.split("[", 1)[1].split("]", 1)[0]
        now = dt.datetime.strptime(stamp, "%d/%b/%Y:%H:%M:%S %z").timestamp()
        body_bytes = int(nginx_line.split('" ', 1)[1].split(" ")[1])
        ours = format_line(
            "127.0.0.1",
            now,
            line.decode("latin-1"),
            403,
            body_bytes,
            referer,
            ua,
            None,
            None,
            None,
            time_local=time_local,
        )
        assert ours == nginx_line


@pytest.mark.skipif(FAIL2BAN_REGEX is None, reason="fail2ban-regex (Debian fail2ban) is missing")
def test_reference_fail2ban_filter_matches_confedge_lines(tmp_path: Path) -> None:
    assert FAIL2BAN_REGEX is not None
    conf = tmp_path / "pexiprp.conf"
    conf.write_text(PEXIPRP_CONF)
    now = time.time()
    token = request_line("POST", "/api/client/v2/conferences/meet.alice/request_token")
    lines = [
        # A wrong PIN: the node answers 403 and the proxy passes it on.
        format_line(
            "203.0.113.7",
            now,
            token,
            403,
            56,
            "https://edge/webapp/",
            "Mozilla/5.0",
            "10.0.0.11:443",
            "403",
            "0.004",
        ),
        # IPv6 clients are found too.
        format_line(
            "2001:db8::7",
            now,
            token,
            403,
            56,
            None,
            None,
            "10.0.0.12:443",
            "403",
            "0.003",
        ),
        # After a failover nginx logs joined upstream fields ("502, 403"), which the reference's
        # filter does not match (it wants exactly "403"); confedge logs the same way, so an
        # external fail2ban behaves exactly as it did beside nginx. The guard has no such gap.
        format_line(
            "203.0.113.10",
            now,
            token,
            403,
            56,
            None,
            None,
            "10.0.0.11:443, 10.0.0.12:443",
            "502, 403",
            "0.001, 0.003",
        ),
        # A right PIN: 200, must not count.
        format_line(
            "203.0.113.8",
            now,
            token,
            200,
            80,
            "https://edge/webapp/",
            "Mozilla/5.0",
            "10.0.0.11:443",
            "200",
            "0.004",
        ),
        # A 403 elsewhere, must not count.
        format_line(
            "203.0.113.9",
            now,
            request_line("GET", "/api/client/v2/status"),
            403,
            9,
            None,
            None,
            "10.0.0.11:443",
            "403",
            "0.002",
        ),
    ]
    log = tmp_path / "access.log"
    log.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [FAIL2BAN_REGEX, "-o", "ip", str(log), str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert out == ["203.0.113.7", "2001:db8::7"]
    summary = subprocess.run(
        [FAIL2BAN_REGEX, str(log), str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "Lines: 5 lines, 0 ignored, 2 matched, 3 missed" in summary
