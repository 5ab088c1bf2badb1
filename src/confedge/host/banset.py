"""The guard's bans in the kernel: the `confedge_banned_v4`/`_v6` sets of `table inet confedge`.

Why: a banned client that still reaches the proxy costs a TCP and a TLS handshake per attempt
before it reads 429. With `guard.firewall = true` every ban also becomes an element of the nft
set the ruleset drops first (docs/DEPLOY.md), with the ban's remaining time as the element's
timeout, so the kernel forgets it when the ban ends even if confedge is gone by then.

`BanSetSync` is the sans-I/O part: given the active bans and `now` it returns the nft commands
that make the kernel's sets match, and remembers what it has loaded. `KernelBanSet` runs it: the
guard calls its `changed()` (a plain callback, no I/O) when its ban set moves; a background task
coalesces the changes and runs one `nft -f -` per batch.

Why a subprocess of nft rather than bindings: Debian's python3-nftables (libnftables) is not
installable into a venv, and pyroute2's nf_tables support is incomplete for sets with timeouts.
One `nft -f -` per batch is a single transaction, costs a few milliseconds off the event loop
(asyncio subprocess), and its error text is what an operator would see running nft by hand.
No shell is involved and every element is re-rendered from `ipaddress` objects, so a ban
source can never inject nft syntax.

nft has no "replace element" (and 1.0.6 no `destroy`): `add` keeps an existing element's
timeout and `delete` of a missing element fails the whole batch. So an upsert is
"add (1 s), delete, add (timeout)" and a removal "add (1 s), delete", which are valid whatever
the set holds, in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from confedge.guard.core import BanRecord
from confedge.host.ruleset import BAN_SETS, TABLE

__all__ = ["BanSetSync", "KernelBanSet", "element", "read_banned"]

log = logging.getLogger("confedge.host")

VERIFY_EVERY = 30.0  # seconds between checks that the kernel still holds what we loaded


def nft_binary() -> str:
    return shutil.which("nft") or "/usr/sbin/nft"


def element(source: str) -> tuple[int, str] | None:
    """(family, nft element text) of a ban source: an address or an IPv6 /64 ("2001:db8::/64")."""
    try:
        net = ipaddress.ip_network(source, strict=False)
    except ValueError:
        return None
    if net.num_addresses == 1:
        return net.version, str(net.network_address)
    return net.version, str(net)


class BanSetSync:
    """What the kernel sets hold (as far as we loaded them) and the commands to update them."""

    def __init__(self) -> None:
        self.loaded: dict[str, float] = {}  # source -> expiry (Unix time) as loaded

    def plan(self, bans: Iterable[BanRecord], now: float) -> tuple[dict[str, float], list[str]]:
        """The wanted set and the nft commands that turn `loaded` into it."""
        wanted: dict[str, float] = {}
        for rec in bans:
            if rec.expires > now and element(rec.source) is not None:
                wanted[rec.source] = max(wanted.get(rec.source, 0.0), rec.expires)
        cmds: list[str] = []
        for source, expires in wanted.items():
            if self.loaded.get(source) == expires:
                continue
            fam, el = element(source)  # type: ignore[misc]  # filtered above
            left = max(1, math.ceil(expires - now))
            cmds += _remove(fam, el)
            cmds.append(f"add element inet {TABLE} {BAN_SETS[fam]} {{ {el} timeout {left}s }}")
        for source, expires in self.loaded.items():
            # Lifted before its end (`confedge bans remove`); expired ones timed out by themselves.
            if source not in wanted and expires > now + 1:
                fam, el = element(source)  # type: ignore[misc]
                cmds += _remove(fam, el)
        return wanted, cmds

    def applied(self, wanted: dict[str, float]) -> None:
        self.loaded = wanted


def _remove(fam: int, el: str) -> list[str]:
    name = f"inet {TABLE} {BAN_SETS[fam]}"
    return [f"add element {name} {{ {el} timeout 1s }}", f"delete element {name} {{ {el} }}"]


class _Guard(Protocol):
    observers: list[Callable[[], None]]

    def bans(self) -> list[BanRecord]: ...


async def run_nft(nft: str, *args: str, script: str = "") -> tuple[int, str, str]:
    """Run `nft ARGS` (with `script` on stdin for `-f -`); (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        nft,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(script.encode())
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


class KernelBanSet:
    """Keeps the kernel's ban sets equal to the guard's active bans (see the module docstring).

    A runtime component: started after the guard, closed before it."""

    def __init__(
        self, guard: _Guard, *, nft: str | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.guard = guard
        self.nft = nft or nft_binary()
        self.sync = BanSetSync()
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.batches = 0  # nft runs that succeeded (status, tests)

    def changed(self) -> None:
        """The guard's observer: called from its code paths, so it only sets a flag."""
        self._wake.set()

    async def start(self) -> None:
        self.guard.observers.append(self.changed)
        self._wake.set()  # load the bans the guard already holds
        self._task = asyncio.create_task(self._run(), name="kernel-ban-set")

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.guard.observers.remove(self.changed)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(VERIFY_EVERY):  # not wait_for: see cluster/service.py
                    await self._wake.wait()
            await asyncio.sleep(0.01)  # gather a burst of bans into one nft run
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                if not woken:
                    await self.verify()
                await self.apply_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never fatal: the proxy's own 429 still applies
                self._failed(str(exc))
                await asyncio.sleep(1.0)

    async def apply_once(self) -> None:
        wanted, cmds = self.sync.plan(self.guard.bans(), self._clock())
        if not cmds:
            self.sync.applied(wanted)
            return
        try:
            code, _, err = await run_nft(self.nft, "-f", "-", script="\n".join(cmds) + "\n")
        except OSError as exc:
            self._failed(f"cannot run {self.nft}: {exc.strerror or exc}")
            return
        if code != 0:
            self._failed(err.strip().splitlines()[0] if err.strip() else f"exit status {code}")
            return
        self.sync.applied(wanted)
        self.batches += 1
        if self._failing:
            self._failing = False
            log.warning("guard.firewall: kernel ban set updated again")

    async def verify(self) -> None:
        """Forget loaded elements the kernel no longer holds, so the next plan re-adds them.

        The sets vanish when someone flushes the ruleset (`systemctl reload nftables` with the
        stock `flush ruleset`) and reloads it; without this, bans would stay out of the kernel
        until the next ban changed something."""
        if not self.sync.loaded:
            return
        try:
            code, out, _ = await run_nft(self.nft, "-j", "list", "table", "inet", TABLE)
        except OSError:
            return  # reported by apply_once
        present: set[str] = set()
        if code == 0:
            for items in read_banned(out).values():
                present.update(item.split(" ", 1)[0] for item in items)
        now = self._clock()
        for source, expires in list(self.sync.loaded.items()):
            el = element(source)
            if el is not None and el[1] not in present and expires > now + 1:
                del self.sync.loaded[source]

    def _failed(self, reason: str) -> None:
        if not self._failing:  # once per outage, not once per ban
            self._failing = True
            log.warning(
                "guard.firewall: cannot update the kernel ban set (%s); bans still apply in "
                "confedge itself. Load the ruleset with `confedge firewall --apply` and give "
                "confedge CAP_NET_ADMIN (docs/DEPLOY.md)",
                reason,
            )


def read_banned(listing: str, now_left: bool = True) -> dict[int, list[str]]:
    """Elements of the ban sets from `nft -j list table inet confedge`, as "addr timeout Ns".

    `confedge firewall --apply` re-declares them in the new table so a reload keeps the bans
    (each with the time it had left)."""
    out: dict[int, list[str]] = {4: [], 6: []}
    try:
        data: Any = json.loads(listing)
    except ValueError:
        return out
    names = {v: k for k, v in BAN_SETS.items()}
    for item in data.get("nftables", []) if isinstance(data, dict) else []:
        s = item.get("set") if isinstance(item, dict) else None
        if not isinstance(s, dict) or s.get("name") not in names:
            continue
        fam = names[s["name"]]
        for e in s.get("elem", []):
            text = _elem_text(e)
            if text:
                out[fam].append(text)
    return out


def _elem_text(e: Any) -> str | None:
    """One JSON set element ({"elem": {"val": ..., "expires": N}} or a bare value) as text."""
    left: Any = None
    val = e
    if isinstance(e, dict) and "elem" in e:
        left = e["elem"].get("expires") or e["elem"].get("timeout")
        val = e["elem"].get("val")
    if isinstance(val, dict) and "prefix" in val:
        val = f"{val['prefix'].get('addr')}/{val['prefix'].get('len')}"
    if isinstance(val, dict) and "range" in val:
        return None  # not something the guard writes
    if not isinstance(val, str) or element(val) is None:
        return None
    el = element(val)[1]  # type: ignore[index]  # re-rendered: never raw text from outside
    if isinstance(left, int | float) and left > 0:
        return f"{el} timeout {max(1, math.ceil(left))}s"
    return el
