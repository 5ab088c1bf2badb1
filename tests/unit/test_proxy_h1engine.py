"""Choosing how HTTP/1.1 heads are read (proxy.http1_engine, CONFEDGE_H1_ENGINE): the same rule
as the other native backends (confedge/backends.py), said by `confedge check`, refused at start
when "native" is asked for and the extension is not built (here made absent by hand, so these
run whether or not it is built)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from confedge.config import ConfigError, parse_config
from confedge.proxy import h1engine


def test_choose_falls_back_and_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(h1engine.ENV, raising=False)
    monkeypatch.setattr(h1engine, "_h1native", None)
    assert h1engine.choose("auto") == "python"
    assert h1engine.readers("python") == (None, None)
    with pytest.raises(ValueError, match=r'^proxy\.http1_engine = "native": .*C compiler'):
        h1engine.choose("native")
    monkeypatch.setenv(h1engine.ENV, "native")
    with pytest.raises(ValueError, match=r'^CONFEDGE_H1_ENGINE = "native"'):
        h1engine.choose("auto")
    monkeypatch.setenv(h1engine.ENV, "python")
    assert h1engine.choose("native") == "python"  # (the environment wins: the test suites)


def test_check_reports_the_reader_and_refuses_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from confedge.cli import main

    monkeypatch.delenv(h1engine.ENV, raising=False)
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\nstate_dir = "{tmp_path}/state"\n[proxy]\nnodes = ["10.0.0.11"]\n'
        'http1_engine = "native"\n[turn]\nenabled = false\n'
    )
    if h1engine.native_available()[0]:
        assert main(["check", "--config", str(path)]) == 0
        assert "# HTTP/1.1 heads: C fast path for ordinary heads" in capsys.readouterr().out
    monkeypatch.setattr(h1engine, "_h1native", None)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('confedge: proxy.http1_engine = "native": the extension')


def test_the_service_refuses_to_start_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`confedge run`: a ConfigError naming the key before anything listens, not a worker
    that fails later."""
    from confedge.proxy.service import ProxyService

    monkeypatch.delenv(h1engine.ENV, raising=False)
    monkeypatch.setattr(h1engine, "_h1native", None)
    cfg = parse_config(
        {
            "server": {"state_dir": str(tmp_path)},
            "proxy": {"nodes": ["127.0.0.1:9"], "http1_engine": "native"},
            "turn": {"enabled": False},
            "guard": {"enabled": False},
        }
    )
    svc = ProxyService(cfg)
    with pytest.raises(ConfigError, match=r'proxy\.http1_engine = "native"'):
        asyncio.run(svc.start())
