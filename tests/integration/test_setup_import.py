"""`confedge import-reference DIR` on copies of a restricted-mode and a permissive-mode reference
appliance (tests/fixtures/reference/, written for these tests in the shapes of pexip/rp-turn's
wizard answers, nginx site, turnserver.conf, coturn user database, fail2ban jail and PEM), then
the imported configuration run for real: the proxy, TURN and the guard behave as the
reference's did. Only the listening ports are moved (to free loopback ports) and the node list
pointed at a recording node; every other value is the imported one."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from setup_support import (
    GOOD_PIN,
    TurnClient,
    confedge,
    https,
    on_loopback,
    recording_node,
    rest_credential,
    running,
    turn_allocate,
)

from confedge.stun.constants import MsgClass

FIXTURES = Path(__file__).parent.parent / "fixtures" / "reference"
TOKEN = "/api/client/v2/conferences/meet/request_token"


def _import(kind: str, tmp_path: Path, node_url: str) -> tuple[Path, int, int, str]:
    config = tmp_path / "confedge.toml"
    https_port, turn_port, flags = on_loopback(tmp_path / "state", **{"proxy.nodes": node_url})
    result = confedge("import-reference", str(FIXTURES / kind), "--config", str(config), *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    return config, https_port, turn_port, result.stdout


def test_restricted_appliance(tmp_path: Path) -> None:
    with recording_node() as node:
        config, https_port, turn_port, out = _import("restricted", tmp_path, node.url)
        # What could not be carried over: one line each, with the reason.
        assert "not carried over: etc/turnserver.conf: mobility: no confedge equivalent\n" in out
        assert (
            "not carried over: etc/fail2ban/jail.local: [pexiprp] ignoreip jump.example.com: "
            "not an address or network (host names are not resolved)\n" in out
        )
        assert "not carried over: home/pexip/.reverseproxy-config.json: snmp: " in out
        assert "bans after 3 (docs/GUARD.md)" in out
        pem = tmp_path / "state" / "tls" / "reference.pem"
        assert f"is copied to {pem} (mode 0600)" in out
        assert (pem.stat().st_mode & 0o777) == 0o600
        data = tomllib.loads(config.read_text())
        assert (
            data["server"]["domain"] == "example.com" and "external_address" not in data["server"]
        )
        assert data["proxy"]["balance"] == "ip-hash"
        assert data["turn"]["username"] == "pexturn" and data["turn"]["media_nodes"] == [
            "127.0.0.2"
        ]
        assert data["guard"]["maxretry"] == 3 and data["guard"]["bantime"] == 600
        assert data["guard"]["ignore"] == ["192.168.10.0/24"]
        assert data["management"]["networks"] == ["192.168.10.0/24"]
        assert confedge("check", "--config", str(config)).returncode == 0

        with running(config, https_port):
            # The proxy: the node answers, the reference's CSP is added, its certificate served.
            status, headers, cn = https(
                https_port, "GET", "/api/client/v2/conferences/meet/conference_status"
            )
            assert status == 200 and cn == "rp.example.com"
            assert headers["content-security-policy"].startswith(
                "default-src 'self'; frame-src 'self' https://*.office.com;"
            )
            # TURN: the media node may allocate; another address may not.
            creds = {"username": "pexturn", "password": "Fjord-Kettle-42", "realm": "example.com"}
            node_client = TurnClient(turn_port, "127.0.0.2", **creds)
            try:
                assert node_client.allocate() == (MsgClass.SUCCESS, 0)
                # The peer rules hold as in coturn: every address denied (a public one too, which
                # restricted mode would otherwise admit) except the allowed media node.
                assert node_client.permit("127.0.0.2") == (MsgClass.SUCCESS, 0)
                assert node_client.permit("127.0.0.5") == (MsgClass.ERROR, 403)
                assert node_client.permit("8.8.8.8") == (MsgClass.ERROR, 403)
            finally:
                node_client.close()
            refused = turn_allocate(turn_port, source="127.0.0.3", **creds)
            assert refused is None or refused[0] == MsgClass.ERROR
            # The guard: the reference's maxretry = 6 banned after 3 wrong PINs; so does this.
            for _ in range(3):
                assert https(https_port, "POST", TOKEN, {"pin": "0000"})[0] == 403
            assert https(https_port, "POST", TOKEN, {"pin": GOOD_PIN})[0] == 429
            assert sum(1 for _, p, _ in node.seen if p == TOKEN) == 3


def test_permissive_appliance(tmp_path: Path) -> None:
    with recording_node() as node:
        config, https_port, turn_port, out = _import("permissive", tmp_path, node.url)
        assert "etc/turnuserdb.conf" in out.splitlines()[0]  # the secret came from coturn's db
        data = tomllib.loads(config.read_text())
        assert data["server"]["external_address"] == "127.0.0.2"
        assert data["turn"]["mode"] == "permissive" and data["proxy"]["csp"] is False
        (secret,) = data["turn"]["secrets"]
        assert data["guard"]["enabled"] is False

        with running(config, https_port):
            status, headers, cn = https(https_port, "GET", "/api/client/v2/status")
            assert status == 200 and cn == "turn.example.org"
            assert "content-security-policy" not in headers
            # A browser's REST credential minted with the imported secret allocates.
            username, password = rest_credential(secret)
            creds = {"username": username, "realm": "example.org"}
            ok = turn_allocate(turn_port, source="127.0.0.1", password=password, **creds)
            assert ok == (MsgClass.SUCCESS, 0)
            wrong = turn_allocate(
                turn_port, source="127.0.0.1", password=rest_credential("other")[1], **creds
            )
            assert wrong == (MsgClass.ERROR, 401)
            # Guard off, as on the appliance (enablefail2ban false): wrong PINs all reach a node.
            for _ in range(6):
                assert https(https_port, "POST", TOKEN, {"pin": "0000"})[0] == 403
            assert sum(1 for _, p, _ in node.seen if p == TOKEN) == 6


def _dry_import(config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return confedge(
        "import-reference", str(FIXTURES / "restricted"), "--config", str(config), "--dry-run",
        "--set", f"server.state_dir={tmp_path / 'state'}",
    )  # fmt: skip


def test_dry_run_and_bad_directories(tmp_path: Path) -> None:
    config = tmp_path / "confedge.toml"
    result = _dry_import(config, tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'password = "****"' in result.stdout and "Fjord-Kettle-42" not in result.stdout
    assert not config.exists() and not (tmp_path / "state").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = confedge("import-reference", str(empty), "--config", str(config))
    assert result.returncode == 2
    assert "none of the reference's files found" in result.stderr
    result = confedge("import-reference", str(tmp_path / "nope"), "--config", str(config))
    assert result.returncode == 2 and "not a directory" in result.stderr

    # A password coturn keeps only as a key cannot be carried over: said, and the fix given.
    appliance = tmp_path / "appliance"
    (appliance / "etc").mkdir(parents=True)
    (appliance / "etc" / "turnserver.conf").write_text(
        "listening-ip=127.0.0.1\nrealm=example.com\nuser=pexturn:0x8f9a0c2b3d4e5f60718293a4b5c6d7e8\n"
    )
    result = confedge(
        "import-reference",
        str(appliance),
        "--config",
        str(config),
        "--set",
        "proxy.enabled=false",
        "--set",
        "turn.media_nodes=10.0.0.0/24",
    )
    assert result.returncode == 2
    assert (
        "not carried over: etc/turnserver.conf: user=pexturn: the password is kept only as an "
        "HMAC key; give it with --set turn.password=... (the one configured on the "
        "conferencing platform)\n" in result.stdout
    )
    assert (
        result.stderr == 'confedge: turn.password: "" is empty; restricted TURN needs a password\n'
    )
    assert not config.exists()


def test_an_installed_certificate_is_kept(tmp_path: Path) -> None:
    """Importing over a configuration that names a certificate keeps that certificate."""
    config = tmp_path / "confedge.toml"
    config.write_text('[tls]\ncert = "/etc/confedge/own.pem"\n')
    result = _dry_import(config, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        f"etc/nginx/ssl/pexip.pem: {config} already names a certificate "
        "(/etc/confedge/own.pem), which is kept; install the reference's with "
        "`confedge cert install`\n" in result.stdout
    )
    assert 'cert = "/etc/confedge/own.pem"' in result.stdout
    assert not (tmp_path / "state").exists()
