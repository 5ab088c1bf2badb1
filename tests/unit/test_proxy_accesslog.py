"""Access-log line format (the reference's nginx log_format) and the buffered writer."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confedge.proxy.accesslog import (
    AccessLog,
    TimeLocal,
    escape,
    filter_secrets,
    format_line,
    remote_user,
    request_line,
)

UTC_TIME = TimeLocal(utc=True)
NOW = 1795608000.25  # 25/Nov/2026:12:00:00 +0000

# The shape of the reference's log line: fields in order, two spaces after "]".
LINE_RE = re.compile(
    r'^(?P<addr>\S+) - (?P<user>\S+) \[(?P<time>[^\]]+)\]  "(?P<request>[^"]*)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) "(?P<referer>[^"]*)" "(?P<ua>[^"]*)" "(?P<uaddr>[^"]*)" '
    r'"(?P<ustatus>[^"]*)" "(?P<utime>[^"]*)"$'
)


def test_reference_example_line() -> None:
    # The example entry in the reference's fail2ban filter, reproduced field by field.
    line = format_line(
        "192.168.1.103",
        1471530318.0,
        request_line("POST", "/api/client/v2/conferences/vmr.fred@example.com/request_token"),
        403,
        56,
        "https://192.168.1.206/webapp/",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/52.0.2743.116 Safari/537.36",
        "192.168.1.251:443",
        "403",
        "2.006",
        time_local=UTC_TIME,
    )
    assert line == (
        '192.168.1.103 - - [18/Aug/2016:14:25:18 +0000]  "POST /api/client/v2/conferences/'
        'vmr.fred@example.com/request_token HTTP/1.1" 403 56 "https://192.168.1.206/webapp/" '
        '"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) '
        'Chrome/52.0.2743.116 Safari/537.36" "192.168.1.251:443" "403" "2.006"'
    )


def test_empty_values_are_dashes() -> None:
    line = format_line("::1", NOW, "GET / HTTP/1.1", 301, 0, time_local=UTC_TIME)
    # The reference's Referer passes through a map, so an absent one logs as "" (see format_line).
    assert line == (
        '::1 - - [25/Nov/2026:12:00:00 +0000]  "GET / HTTP/1.1" 301 0 "" "-" "-" "-" "-"'
    )
    # A User-Agent header sent empty is a found empty value: nginx logs nothing, not "-"
    # (checked against real nginx in tests/e2e/test_proxy_accesslog_reference.py).
    line = format_line("::1", NOW, "", 400, 0, "", b"", time_local=UTC_TIME)
    assert line == '::1 - - [25/Nov/2026:12:00:00 +0000]  "-" 400 0 "" "" "-" "-" "-"'


def b64(raw: bytes) -> bytes:
    import base64

    return base64.b64encode(raw)


@pytest.mark.parametrize(
    ("authorization", "user"),
    [
        (None, None),
        (b"Basic " + b64(b"alice:secret"), "alice"),
        (b"basic " + b64(b"lower:pw"), "lower"),  # the scheme is case-insensitive
        (b"Basic    " + b64(b"spaces:pw"), "spaces"),
        (b"Basic " + b64(b"a:b:c"), "a"),  # the name ends at the first ":"
        (b"Basic " + b64(b"pad:"), "pad"),
        (b"Basic " + b64(b"bob:pw")[:-1], "bob"),  # nginx decodes without padding
        (b"Basic " + b64(b":pw"), None),  # an empty name
        (b"Basic " + b64(b"nocolon"), None),
        (b"Basic !!!notb64", None),
        (b"Basic " + b64(b"bob:pw") + b" trailing", None),
        (b"Basic ", None),
        (b"Basic", None),
        (b"Bearer abc", None),
        (b"Basic " + b64(b'ev"il\\ \x01\xc3\xa9 x:pw'), 'ev"il\\ \x01\xc3\xa9 x'),
    ],
)
def test_remote_user_as_nginx_decodes_it(authorization: bytes | None, user: str | None) -> None:
    assert remote_user(authorization) == user


def test_remote_user_is_escaped_and_never_the_password() -> None:
    user = remote_user(b"Basic " + b64(b'x" 200 "\r\n1.2.3.4 - - [:hunter2'))
    line = format_line(
        "192.0.2.1", NOW, "GET / HTTP/1.1", 200, 0, remote_user=user, time_local=UTC_TIME
    )
    assert line.startswith("192.0.2.1 - x\\x22 200 \\x22\\x0D\\x0A1.2.3.4 - - [ [25/Nov/2026")
    assert "hunter2" not in line and "\n" not in line


def test_multiple_upstream_attempts_as_nginx_joins_them() -> None:
    line = format_line(
        "10.1.1.1",
        NOW,
        "GET /api HTTP/1.1",
        200,
        5,
        None,
        "curl/8",
        "10.0.0.11:443, 10.0.0.12:443",
        "502, 200",
        "0.004, 0.010",
        time_local=UTC_TIME,
    )
    m = LINE_RE.match(line)
    assert m and m["uaddr"] == "10.0.0.11:443, 10.0.0.12:443" and m["ustatus"] == "502, 200"


class TestEscape:
    def test_like_nginx(self) -> None:
        assert escape('a"b\\c') == "a\\x22b\\x5Cc"
        assert escape("tab\there\x7f") == "tab\\x09here\\x7F"
        assert escape("caf\xc3\xa9") == "caf\\xC3\\xA9"  # latin-1-decoded UTF-8 bytes
        assert escape(b"caf\xc3\xa9") == "caf\\xC3\\xA9"
        assert escape("caf\u00e9") == "caf\\xE9"
        assert escape("\u20ac") == "\\xE2\\x82\\xAC"  # beyond latin-1: its UTF-8 bytes
        assert escape("") == "-" and escape(None) == "-" and escape(b"") == "-"
        assert escape("plain ascii (ok) 'q' <>") == "plain ascii (ok) 'q' <>"

    def test_injection_cannot_forge_fields_or_lines(self) -> None:
        ua = 'x" "evil" 200 "\r\n1.2.3.4 - - [01/Jan/2020:00:00:00 +0000]  "POST /x'
        line = format_line("5.6.7.8", NOW, "GET / HTTP/1.1", 200, 1, None, ua, time_local=UTC_TIME)
        assert "\n" not in line and "\r" not in line
        m = LINE_RE.match(line)
        assert m and m["addr"] == "5.6.7.8" and m["status"] == "200"

    @given(st.text(max_size=40))
    def test_shortcut_agrees_with_the_pattern(self, s: str) -> None:
        """escape's printable-ASCII shortcut returns a value unchanged only where the
        pattern finds nothing to escape, for every character class."""
        from confedge.proxy.accesslog import _NEEDS_ESCAPE_RE

        assert (escape(s) == s) == (bool(s) and _NEEDS_ESCAPE_RE.search(s) is None)

    def test_every_latin1_character(self) -> None:
        from confedge.proxy.accesslog import _NEEDS_ESCAPE_RE

        for c in map(chr, range(256)):
            plain = _NEEDS_ESCAPE_RE.search(c) is None
            assert (escape(c) == c) == plain, repr(c)
            assert escape("ab" + c) == ("ab" + c if plain else "ab" + f"\\x{ord(c):02X}")

    @given(st.text(max_size=60))
    def test_fuzz_one_field_stays_one_field(self, s: str) -> None:
        line = format_line("1.2.3.4", NOW, s, 200, 0, s, s, s, s, s, time_local=UTC_TIME)
        assert line.isascii() and "\n" not in line
        assert LINE_RE.match(line)


class TestFilter:
    @pytest.mark.parametrize(
        ("before", "after"),
        [
            ("GET /a?pin=1234 HTTP/1.1", "GET /a?pin=[FILTERED] HTTP/1.1"),
            ("GET /a?x=1&token=abc&y=2 HTTP/1.1", "GET /a?x=1&token=[FILTERED]&y=2 HTTP/1.1"),
            (
                "GET /cb?code=AAA&state=BBB&data=CCC HTTP/1.1",
                "GET /cb?code=[FILTERED]&state=[FILTERED]&data=[FILTERED] HTTP/1.1",
            ),
            ("GET /a?access_token=zz HTTP/1.1", "GET /a?access_token=[FILTERED] HTTP/1.1"),
            ("GET /a?PIN=1&pin=2 HTTP/1.1", "GET /a?PIN=[FILTERED]&pin=[FILTERED] HTTP/1.1"),
            ("GET /a?pin= HTTP/1.1", "GET /a?pin=[FILTERED] HTTP/1.1"),
            ("GET /a?pinned=1&pink=2 HTTP/1.1", "GET /a?pinned=1&pink=2 HTTP/1.1"),
            ("GET /token=abc HTTP/1.1", "GET /token=abc HTTP/1.1"),  # a path, not a parameter
            (
                "https://h/webapp/?conference=x&pin=99",
                "https://h/webapp/?conference=x&pin=[FILTERED]",
            ),
            ("GET /plain HTTP/1.1", "GET /plain HTTP/1.1"),
        ],
    )
    def test_filter(self, before: str, after: str) -> None:
        assert filter_secrets(before) == after

    # Targets built from the pieces that matter to the pattern: separators, the secret names
    # in any case, names that merely contain them, and characters whose Unicode case folding
    # meets an ASCII letter (U+017F long s, U+212A Kelvin sign, U+0130 dotted I).
    @given(
        st.lists(
            st.sampled_from(
                [
                    "?",
                    "&",
                    ";",
                    "=",
                    " ",
                    "/",
                    "a",
                    "x",
                    "code",
                    "CoDe",
                    "state",
                    "sTaTe",
                    "token",
                    "TOKEN",
                    "pin",
                    "Pin",
                    "data",
                    "postcode",
                    "access_token",
                    "pinned",
                    "\u017ftate",
                    "to\u212aen",
                    "p\u0130n",
                    "\xe9",
                    "\t",
                    "%3D",
                ]
            ),
            max_size=14,
        )
    )
    def test_shortcuts_agree_with_the_pattern(self, pieces: list[str]) -> None:
        """filter_secrets' substring tests skip only what the pattern would leave alone."""
        from confedge.proxy.accesslog import _SECRET_RE

        text = "".join(pieces)
        assert filter_secrets(text) == _SECRET_RE.sub(r"\1=[FILTERED]", text)

    def test_filtered_in_request_and_referer_not_in_user_agent(self) -> None:
        line = format_line(
            "1.1.1.1",
            NOW,
            "GET /x?token=SECRET1 HTTP/1.1",
            200,
            0,
            "https://h/?pin=SECRET2",
            "ua?pin=kept",
            time_local=UTC_TIME,
        )
        assert "SECRET" not in line
        assert "ua?pin=kept" in line  # the reference filters $request and $http_referer only


class TestTimeLocal:
    def test_utc(self) -> None:
        assert UTC_TIME(NOW) == "25/Nov/2026:12:00:00 +0000"
        assert UTC_TIME(0) == "01/Jan/1970:00:00:00 +0000"

    def test_local_zone_offset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TZ", "Asia/Kolkata")
        time.tzset()
        try:
            assert TimeLocal()(NOW) == "25/Nov/2026:17:30:00 +0530"
            monkeypatch.setenv("TZ", "America/St_Johns")
            time.tzset()
            assert TimeLocal()(NOW) == "25/Nov/2026:08:30:00 -0330"
        finally:
            monkeypatch.delenv("TZ")
            time.tzset()

    def test_cached_per_second(self) -> None:
        t = TimeLocal(utc=True)
        assert t(NOW) is t(NOW + 0.5)
        assert t(NOW + 1) == "25/Nov/2026:12:00:01 +0000"


_FIELD = st.one_of(st.none(), st.text(max_size=12), st.binary(max_size=12))
_TEXT = st.one_of(st.none(), st.text(max_size=12))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["1.2.3.4", "2001:db8::1", 'x"y']),
            st.sampled_from(["GET /a?pin=1 HTTP/1.1", 'GET /"\\ HTTP/1.0', "-"]),
            st.integers(100, 599),
            st.integers(0, 10**9),
            _FIELD,
            _FIELD,
            _TEXT,
            _TEXT,
            _TEXT,
        ),
        max_size=20,
    )
)
def test_writer_lines_equal_format_line(rows: list[tuple]) -> None:  # type: ignore[type-arg]
    """The writer's memoised formatting gives exactly format_line's text, repeats included."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "access.log"
        log = AccessLog(str(path), time_local=UTC_TIME)
        want = []
        for row in rows + rows:  # the second pass hits the memos
            addr, req, status, nbytes, ref, ua, uaddr, ustatus, utime = row
            log.log(addr, NOW, req, status, nbytes, ref, ua, uaddr, ustatus, utime)
            want.append(
                format_line(
                    addr,
                    NOW,
                    req,
                    status,
                    nbytes,
                    ref,
                    ua,
                    uaddr,
                    ustatus,
                    utime,
                    time_local=UTC_TIME,
                )
            )
        log.close()
        got = path.read_bytes().decode("utf-8").split("\n")[:-1] if want else []
        assert got == want


class TestWriter:
    def test_write_through_without_loop(self, tmp_path: Path) -> None:
        p = tmp_path / "access.log"
        log = AccessLog(str(p), time_local=UTC_TIME)
        log.log("1.2.3.4", NOW, "GET / HTTP/1.1", 200, 3)
        assert p.read_text().endswith('"" "-" "-" "-" "-"\n')
        log.close()

    async def test_buffered_until_interval(self, tmp_path: Path) -> None:
        p = tmp_path / "access.log"
        log = AccessLog(str(p), flush_interval=0.05, time_local=UTC_TIME)
        for i in range(100):
            log.log("1.2.3.4", NOW, f"GET /{i} HTTP/1.1", 200, i)
        assert p.read_text() == ""  # nothing written per line
        await asyncio.sleep(0.15)
        lines = p.read_text().splitlines()
        assert len(lines) == 100
        assert all(LINE_RE.match(line) for line in lines)
        assert lines[99].startswith(
            '1.2.3.4 - - [25/Nov/2026:12:00:00 +0000]  "GET /99 HTTP/1.1" 200 99'
        )
        log.close()

    async def test_flush_when_buffer_full(self, tmp_path: Path) -> None:
        p = tmp_path / "access.log"
        log = AccessLog(str(p), flush_interval=60, buffer_bytes=1000, time_local=UTC_TIME)
        for i in range(20):
            log.log("1.2.3.4", NOW, f"GET /{i} HTTP/1.1", 200, i)
        assert 0 < len(p.read_text().splitlines()) < 20
        log.close()
        assert len(p.read_text().splitlines()) == 20

    def test_reopen_after_rotation(self, tmp_path: Path) -> None:
        p = tmp_path / "access.log"
        log = AccessLog(str(p), time_local=UTC_TIME)
        log.log("1.1.1.1", NOW, "GET /before HTTP/1.1", 200, 0)
        os.rename(p, tmp_path / "access.log.1")
        log.reopen()
        log.log("1.1.1.1", NOW, "GET /after HTTP/1.1", 200, 0)
        log.close()
        assert "/before" in (tmp_path / "access.log.1").read_text()
        assert "/after" in p.read_text() and "/before" not in p.read_text()

    def test_detects_rotation_by_itself(self, tmp_path: Path) -> None:
        p = tmp_path / "access.log"
        log = AccessLog(str(p), time_local=UTC_TIME)
        log.log("1.1.1.1", NOW, "GET /before HTTP/1.1", 200, 0)
        os.rename(p, tmp_path / "access.log.1")
        log._checked = 0.0  # the once-a-second throttle, as if a second had passed
        log.log("1.1.1.1", NOW, "GET /after HTTP/1.1", 200, 0)
        log.close()
        assert "/after" in p.read_text()

    def test_unwritable_path_is_a_clear_error(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"proxy\.access_log: cannot open .*missing"):
            AccessLog(str(tmp_path / "missing" / "access.log"))

    def test_stderr(self, capfd: pytest.CaptureFixture[str]) -> None:
        log = AccessLog("", time_local=UTC_TIME)
        log.log("9.9.9.9", NOW, "GET / HTTP/1.1", 204, 0)
        log.close()
        assert capfd.readouterr().err.startswith("9.9.9.9 - - [25/Nov/2026")


def test_request_counters_sum_in_a_stable_order() -> None:
    from confedge.proxy.accesslog import RequestCounter

    a, b = RequestCounter(None), RequestCounter(None)
    for status in (200, 204, 404):
        a.log("192.0.2.1", 0.0, "GET / HTTP/1.1", status, 0)
    b.log("192.0.2.2", 0.0, "GET / HTTP/1.1", 503, 0)
    b.log("192.0.2.2", 0.0, "GET / HTTP/1.1", 999, 0)
    total = RequestCounter.add(RequestCounter.add({}, a.to_json()), b.to_json())
    assert total == {"total": 5, "other": 1, "1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 1}
    assert list(total) == list(a.to_json())  # /metrics lists the classes in one order
