"""A network namespace joined to the host by a veth pair, with link faults from nftables.

The agent runs inside the namespace (`ip netns exec NAME ...`); the broker listens on the host end
of the veth. Faults are nftables rules that act like the cable: each direction is dropped where it
ARRIVES, on the ingress hook of the receiving end's veth (a `netdev` table inside the namespace for
host -> agent, one bound to the host end's veth for agent -> host; nothing else on the host is
touched). Dropping on the sender's own egress / OUTPUT hook would not do: the sender's TCP sees
such a drop as local congestion (NET_XMIT_DROP / EPERM) and retries every 500 ms without backing
off (seen here: a stalled connection then failed with ETIMEDOUT within a minute), which no cut
cable causes. Dropped on arrival, the sender hears nothing and backs off exponentially, as on a
real network.

    with NetNs() as ns:                 # namespace, veth, addresses, the (empty) nft tables
        ns.popen([...])                 # a process inside it
        ns.partition(); ns.heal()       # drop everything / nothing
        ns.loss(20)                     # drop 20 % of packets at random, each direction

Needs root, `ip` (iproute2) and `nft` (Debian package `nftables`). `tc netem` is not used: this
kernel has no netem qdisc. Everything made here is removed by `close()` (also on failure), and a
namespace left by a killed run is found by its name prefix and removed by `cleanup_stale()`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from types import TracebackType
from typing import Any

PREFIX = "ea-chaos-"  # namespaces made here, so a stale one can be recognised
_TABLE = "edgechaos"
_serial = itertools.count()


class NetNsError(RuntimeError):
    pass


def _run(args: list[str], check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, check=False, input=input_text, timeout=30)
    if check and r.returncode != 0:
        raise NetNsError(f"{' '.join(args)}: {(r.stderr or r.stdout).strip()[:300]}")
    return r


def unavailable_reason() -> str | None:
    """None when namespaces, veth pairs and nftables work here, else why not (in words)."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_SYS_ADMIN / CAP_NET_ADMIN"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install -y {pkg})"
    try:
        with NetNs(tag="probe"):
            pass
    except NetNsError as exc:
        return f"cannot make a namespace with a veth pair and an nft table: {exc}"
    return None


def _used_subnets() -> set[str]:
    out = _run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            addr = parts[parts.index("inet") + 1].split("/")[0]
            used.add(".".join(addr.split(".")[:3]))
    return used


def _kill_and_delete(name: str) -> None:
    """End the processes inside namespace `name` (by pid) and delete it (its veth end goes with it)."""
    for pid in _ns_pids(name):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(20):  # a process being killed can hold the namespace for a moment
        r = _run(["ip", "netns", "del", name], check=False)
        if r.returncode == 0 or "No such file" in r.stderr:
            return
        time.sleep(0.1)


def _ns_pids(name: str) -> list[int]:
    r = _run(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def cleanup_stale() -> list[str]:
    """Remove namespaces and host nft tables of ours whose creating process is gone (a run killed mid-way)."""
    removed = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = name.rsplit("-", 1)[-1]
        if not name.startswith(PREFIX) or not owner.isdigit() or os.path.exists(f"/proc/{owner}"):
            continue  # not ours, or its owner still runs (another scenario right now)
        _kill_and_delete(name)
        removed.append(name)
    for line in _run(["nft", "list", "tables", "netdev"], check=False).stdout.splitlines():
        table = line.split()[-1] if line.startswith("table netdev ") else ""
        parts = table.split("_")
        if table.startswith(f"{_TABLE}_") and len(parts) == 3 and parts[1].isdigit() \
                and not os.path.exists(f"/proc/{parts[1]}"):
            _run(["nft", "delete", "table", "netdev", table], check=False)
            removed.append(f"nft table {table}")
    return removed


class NetNs:
    """One namespace `ea-chaos-<tag><n>-<pid>` with veth `<host_if>` (host) <-> `<ns_if>` (inside), a /30 each end."""

    def __init__(self, tag: str = "net", name: str | None = None) -> None:
        n = next(_serial)
        self.name = name or f"{PREFIX}{tag}{n}-{os.getpid()}"
        short = f"{os.getpid() % 100000:05d}{n % 100:02d}"
        self.host_if, self.ns_if = f"eah{short}", f"ean{short}"  # <= 15 characters (IFNAMSIZ)
        self.host_ip = self.ns_ip = ""
        self._made_ns = self._made_link = self._made_host_table = False
        self.host_table = f"{_TABLE}_{os.getpid()}_{n}"  # in the host's namespace: owner pid in the name
        self.faults: list[tuple[float, str]] = []  # (monotonic, what) for the record

    # ---- life cycle -----------------------------------------------------------------------------
    def up(self) -> NetNs:
        try:
            _run(["ip", "netns", "add", self.name])
            self._made_ns = True
            _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if])
            self._made_link = True
            _run(["ip", "link", "set", self.ns_if, "netns", self.name])
            used = _used_subnets()
            base = next((f"10.231.{n}" for n in range(os.getpid() % 200, 256) if f"10.231.{n}" not in used), None)
            if base is None:
                raise NetNsError("no free 10.231.x.0/30 subnet")
            self.host_ip, self.ns_ip = f"{base}.1", f"{base}.2"
            _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
            _run(["ip", "link", "set", self.host_if, "up"])
            _run(["ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if])
            _run(["ip", "-n", self.name, "link", "set", self.ns_if, "up"])
            _run(["ip", "-n", self.name, "link", "set", "lo", "up"])
            # the fault tables, empty = healthy: ingress of the inside end (host -> agent) and of the
            # host end (agent -> host), so a drop is never seen by the sender's own stack
            self._nft(self._table(self.ns_if), inside=True)
            self._made_host_table = True
            self._nft(self._table(self.host_if), inside=False)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> NetNs:
        return self.up()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Kill what still runs inside, drop the rules, the veth and the namespace; never raises."""
        if self._made_host_table:
            with contextlib.suppress(NetNsError, subprocess.SubprocessError, OSError):
                _run(["nft", "delete", "table", "netdev", self.host_table], check=False)
            self._made_host_table = False
        if self._made_ns:
            with contextlib.suppress(NetNsError, subprocess.SubprocessError, OSError):
                _run(["ip", "netns", "exec", self.name, "nft", "delete", "table", "netdev", _TABLE], check=False)
        if self._made_link:
            # deleting one end deletes the pair (the peer may already be gone with the namespace)
            with contextlib.suppress(NetNsError, subprocess.SubprocessError, OSError):
                _run(["ip", "link", "del", self.host_if], check=False)
            self._made_link = False
        if self._made_ns:
            # processes still inside are ours (the namespace is private to this run): ended by pid
            with contextlib.suppress(NetNsError, subprocess.SubprocessError, OSError):
                _kill_and_delete(self.name)
            self._made_ns = False

    def pids(self) -> list[int]:
        return _ns_pids(self.name)

    # ---- processes --------------------------------------------------------------------------------
    def wrap(self, args: list[str]) -> list[str]:
        """`args` run inside the namespace (ip netns exec execs it: the child's pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *args]

    def popen(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.wrap(args), **kw)

    # ---- faults -----------------------------------------------------------------------------------
    def _table(self, dev: str) -> str:
        name = _TABLE if dev == self.ns_if else self.host_table
        return (f"table netdev {name} {{\n"
                f"  chain ingress {{ type filter hook ingress device \"{dev}\" priority 0; policy accept; }}\n}}\n")

    def _nft(self, script: str, inside: bool) -> None:
        args = ["nft", "-f", "-"]
        _run(self.wrap(args) if inside else args, input_text=script)

    def _set_rules(self, rule: str | None, what: str) -> None:
        for inside, table in ((True, _TABLE), (False, self.host_table)):
            script = f"flush chain netdev {table} ingress\n"
            if rule:
                script += f"add rule netdev {table} ingress {rule}\n"
            self._nft(script, inside)  # agent -> host first changes on the host end, then host -> agent
        self.faults.append((time.monotonic(), what))

    def partition(self) -> None:
        """Drop every packet in both directions (the cable is cut; sockets are not told)."""
        self._set_rules("counter drop", "partition")

    def loss(self, percent: float) -> None:
        """Drop `percent` % of packets at random, independently in each direction."""
        if not 0 < percent <= 100:
            raise ValueError("percent in (0, 100]")
        # numgen draws 0..9999 per packet: 0.01 % resolution
        self._set_rules(f"numgen random mod 10000 < {round(percent * 100)} counter drop", f"loss {percent:g}%")

    def heal(self) -> None:
        """No faults."""
        self._set_rules(None, "heal")

    def dropped(self) -> dict[str, int]:
        """Packets dropped by the current rules (counters restart with each change), per direction."""
        res: dict[str, int] = {}
        for key, inside, table in (("to_agent", True, _TABLE), ("from_agent", False, self.host_table)):
            args = ["nft", "list", "table", "netdev", table]
            out = _run(self.wrap(args) if inside else args, check=False).stdout
            words = out.split()
            res[key] = sum(int(words[i + 1]) for i, w in enumerate(words) if w == "packets" and i + 1 < len(words))
        return res
