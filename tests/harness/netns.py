"""An "office": a network namespace that reaches only what listens on its host address.

Issue #13's setting is an office machine whose only way out is the mirror.
:class:`Office` makes one on this machine: a network namespace with its own
loopback and one end of a veth pair; the other end stays in the host's
namespace with the address :attr:`Office.host_address`. Inside, 127.0.0.1 is
the namespace's own loopback, so the harness's upstream, token server and CDN
(all on the host's 127.0.0.1) are out of reach, while a server listening on
the host address (the mirror, see ``Mirror(listen_host=...)``) is reached. There
is no default route: nothing else is reachable either.

Processes run inside with ``ip netns exec`` (:meth:`Office.run`,
:meth:`Office.popen`, :meth:`Office.command`; ``nsenter --net`` for daemons
that need the host's /sys mounts, such as dockerd's cgroups); :meth:`Office.connect` opens a
socket from inside without a process (a thread joins the namespace, makes
the socket and ends; the socket stays in the namespace), which is how
:class:`tests.harness.canary.Canary` listens inside it too.

Names and the /24 are unique per process and attempt (the pid and a counter
pick them; a name or subnet someone else holds is skipped), so parallel runs
do not collide. :meth:`Office.close` (or leaving the ``with`` block, or a
failed start) kills whatever still runs inside, deletes the veth pair and the
namespace. Needs root and ``ip`` (iproute2).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading

from .lifecycle import Service

IP = "ip"
NSENTER = "nsenter"
NETNS_DIR = "/var/run/netns"
# A private /16 of which each office takes one /24: .1 the host end, .2 the office end.
# (Not 10.231.0.0/24, which the notes' manual recipe uses.)
SUBNETS = ipaddress.ip_network("10.213.0.0/16")
START_ATTEMPTS = 8
_counter = itertools.count()
_counter_lock = threading.Lock()


class NetnsError(RuntimeError):
    pass


def available() -> str | None:
    """Why office tests cannot run here (None: they can)."""
    if shutil.which(IP) is None:
        return "ip not installed (apt-get install iproute2)"
    if shutil.which(NSENTER) is None:
        return "nsenter not installed (apt-get install util-linux)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run([IP, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _subnets_in_use() -> set[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address or a route in."""
    used = set()
    for entry in json.loads(_ip("-4", "-j", "addr", "show").stdout or "[]"):
        for info in entry.get("addr_info", []):
            used.add(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network)
    for route in json.loads(_ip("-4", "-j", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            try:
                used.add(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                pass
    return used


class Office(Service):
    """A network namespace joined to the host by one veth pair.

    ``host_address`` (x.x.x.1) is the host's end: servers the office may
    reach listen there. ``address`` (x.x.x.2) is the office's own end.
    """

    def __init__(self, tag: str = "office"):
        self.tag = tag
        self.name: str | None = None
        self.host_veth: str | None = None
        self.office_veth: str | None = None
        self.subnet: ipaddress.IPv4Network | None = None
        self._created_netns = False
        self._created_veth = False
        self._started: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        last: Exception | None = None
        for _ in range(START_ATTEMPTS):
            try:
                self._create()
                return
            except _Taken as exc:  # a parallel run got this name or subnet first: next one
                last = exc
                self._remove()
        raise NetnsError(f"no free namespace name or subnet after {START_ATTEMPTS} attempts: {last}")

    def _create(self) -> None:
        with _counter_lock:
            n = next(_counter)
        pid = os.getpid()
        self.name = f"rc-{self.tag}-{pid}-{n}"
        short = f"rc{pid:x}x{n:x}"  # interface names are at most 15 characters
        self.host_veth, self.office_veth = short + "h", short + "o"
        self.subnet = self._pick_subnet(pid, n)

        proc = _ip("netns", "add", self.name, check=False)
        if proc.returncode != 0:
            if "exists" in proc.stderr.lower():
                raise _Taken(f"namespace {self.name}: {proc.stderr.strip()}")
            raise NetnsError(f"ip netns add {self.name}: {proc.stderr.strip()}")
        self._created_netns = True
        proc = _ip("link", "add", self.host_veth, "type", "veth", "peer", "name", self.office_veth,
                   check=False)
        if proc.returncode != 0:
            if "exists" in proc.stderr.lower():
                raise _Taken(f"interface {self.host_veth}: {proc.stderr.strip()}")
            raise NetnsError(f"ip link add {self.host_veth}: {proc.stderr.strip()}")
        self._created_veth = True
        _ip("link", "set", self.office_veth, "netns", self.name)
        _ip("addr", "add", f"{self.host_address}/{self.subnet.prefixlen}", "dev", self.host_veth)
        _ip("link", "set", self.host_veth, "up")
        self._inside("ip", "link", "set", "lo", "up")
        self._inside("ip", "addr", "add", f"{self.address}/{self.subnet.prefixlen}", "dev", self.office_veth)
        self._inside("ip", "link", "set", self.office_veth, "up")
        # Two runs that picked the same /24 at the same moment: both see two routes, both retry.
        routes = json.loads(_ip("-4", "-j", "route", "show", str(self.subnet)).stdout or "[]")
        if [r.get("dev") for r in routes] != [self.host_veth]:
            raise _Taken(f"subnet {self.subnet} also routed via {routes}")

    @staticmethod
    def _pick_subnet(pid: int, n: int) -> ipaddress.IPv4Network:
        used = _subnets_in_use()
        subnets = list(SUBNETS.subnets(new_prefix=24))
        first = (pid * 7 + n * 31) % len(subnets)
        for i in range(len(subnets)):
            candidate = subnets[(first + i) % len(subnets)]
            if not any(candidate.overlaps(u) for u in used):
                return candidate
        raise NetnsError(f"every /24 of {SUBNETS} is in use on this machine")

    def stop(self) -> None:
        self._remove()

    close = stop

    def _remove(self) -> None:
        """Kill what runs inside, delete the veth pair and the namespace (each step
        runs even if an earlier one failed)."""
        self._kill_started()
        if self._created_netns and self.name:
            self.kill_processes()
        if self._created_veth and self.host_veth:
            _ip("link", "del", self.host_veth, check=False)  # takes the office end with it
            self._created_veth = False
        if self._created_netns and self.name:
            _ip("netns", "del", self.name, check=False)
            self._created_netns = False

    def _kill_started(self) -> None:
        """Kill and reap what popen() started. Asking the namespace for its pids
        is not enough: a process started a moment ago may still be `ip netns
        exec` on its way in, and would then outlive the namespace's name."""
        started, self._started = self._started, []
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def kill_processes(self) -> list[int]:
        """SIGKILL every process still in the namespace (only ours can be there);
        returns their pids."""
        proc = _ip("netns", "pids", self.name, check=False)
        pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    # ------------------------------------------------------------------ addresses
    @property
    def host_address(self) -> str:
        """The host's end of the veth pair: where servers the office reaches listen."""
        return str(self.subnet.network_address + 1)

    @property
    def address(self) -> str:
        """The office's own address (its end of the veth pair)."""
        return str(self.subnet.network_address + 2)

    # ------------------------------------------------------------------ running inside
    def command(self, cmd: list[str], *, keep_mounts: bool = False) -> list[str]:
        """``cmd`` prefixed to run inside the namespace: with ``ip netns exec``,
        which also mounts a /sys of the namespace's own (its /sys/class/net
        shows the office's interfaces) and so hides the host's cgroup mounts
        under /sys/fs/cgroup; with ``keep_mounts``, with ``nsenter --net``,
        which changes nothing but the network (dockerd needs the cgroups)."""
        if keep_mounts:
            return [NSENTER, f"--net={os.path.join(NETNS_DIR, self.name)}", "--", *cmd]
        return [IP, "netns", "exec", self.name, *cmd]

    def _inside(self, *cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(list(cmd)), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=20)
        if proc.returncode != 0:
            raise NetnsError(f"in {self.name}: {' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        """subprocess.run of ``cmd`` inside the namespace (same keyword arguments)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(cmd), **kw)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        """subprocess.Popen of ``cmd`` inside the namespace. ``ip netns exec``
        execs the command, so the Popen's pid is the command's own. Whatever
        still runs when the office closes is killed."""
        proc = subprocess.Popen(self.command(cmd), **kw)
        self._started.append(proc)
        return proc

    def in_namespace(self, fn, timeout: float = 30.0):
        """Call ``fn()`` in a thread that has joined the namespace; sockets it
        makes stay in the namespace after the thread ends."""
        result: dict = {}

        def target():
            try:
                with open(os.path.join(NETNS_DIR, self.name)) as ns:
                    os.setns(ns.fileno(), os.CLONE_NEWNET)
                result["value"] = fn()
            except BaseException as exc:  # handed to the caller
                result["error"] = exc

        thread = threading.Thread(target=target, name=f"in-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{fn!r} did not finish in {self.name} within {timeout}s")
        if "error" in result:
            raise result["error"]
        return result["value"]

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection opened from inside the office (raises OSError if refused
        or unreachable)."""
        return self.in_namespace(lambda: socket.create_connection((host, port), timeout=timeout),
                                 timeout + 5)

    def reachable(self, host: str, port: int, timeout: float = 5.0) -> str:
        """"open" if a connection from inside succeeds, else the error's name
        (e.g. "ConnectionRefusedError", "OSError: [Errno 101] Network is unreachable")."""
        try:
            self.connect(host, port, timeout).close()
            return "open"
        except OSError as exc:
            return type(exc).__name__ if type(exc) is not OSError else f"OSError: {exc}"

    def __repr__(self) -> str:
        return f"Office({self.name}, host {self.host_address if self.subnet else '?'})"


class _Taken(NetnsError):
    """A name or subnet some other run holds: try the next one."""
