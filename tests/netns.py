"""Emulate several hosts on this machine as Linux network namespaces (multi-host tests).

Topology made by :class:`NetnsLab` (nothing at all is added to the root namespace)::

    <prefix>hub     bridge "br0", one veth end "p<i>" per host enslaved to it
    <prefix><host>  veth end "eth0" = 10.231.0.<i+1>/24 (default subnet), "lo" up

The host namespaces have no default route and no link to the root namespace: from
inside, only the other test hosts of the same lab (and each host's own 127.0.0.1)
can be reached.  The 10.231.0.0/24 addresses exist only inside these namespaces.

Typical use::

    from tests.netns import NetnsLab, netns_unavailable

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with NetnsLab(["ctl", "w1"]) as lab:
        srv = lab.popen("ctl", [sys.executable, "-m", "http.server", "8000"])
        lab.wait_port("ctl", 8000)
        assert lab.can_reach("w1", "ctl", 8000)
        lab.cut("ctl");     assert not lab.can_reach("w1", "ctl", 8000)
        lab.restore("ctl"); assert lab.can_reach("w1", "ctl", 8000)
    # every process started with lab.popen/lab.run is killed, namespaces deleted

Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2 (`apt-get install -y iproute2`).
Run ``python tests/netns.py`` for a self-test that prints what it checks.
"""
from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Self

BASE = "fcnt"                      # every namespace made here starts with this
DEFAULT_SUBNET = "10.231.0.0/24"   # private test range, assigned only inside our namespaces
_PREFIX_RE = re.compile(rf"^{BASE}(\d+)x\d+-")
_HOST_RE = re.compile(r"^[a-z][a-z0-9_]{0,19}$")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
_counter = itertools.count()
_unavailable: list[str | None] = []
_open_labs: list[NetnsLab] = []


class NetnsError(RuntimeError):
    pass


def ip_binary() -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/bin:/bin"
    return shutil.which("ip", path=path)


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    ip = ip_binary()
    if ip is None:
        raise NetnsError("iproute2 'ip' binary not found (apt-get install -y iproute2)")
    r = subprocess.run([ip, *args], check=False, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def list_netns() -> list[str]:
    """Names of all named network namespaces (`ip netns list`, ids stripped)."""
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def netns_unavailable() -> str | None:
    """None when namespaces, bridges and veths can be made here, else a skip reason (cached)."""
    if _unavailable:
        return _unavailable[0]
    _unavailable.append(_probe())
    return _unavailable[0]


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); run the test as root"
    if ip_binary() is None:
        return "iproute2 'ip' binary not found; install it with: apt-get install -y iproute2"
    name = f"{BASE}{os.getpid()}x{next(_counter)}-probe"
    steps = [
        ("netns", "add", name),
        ("-n", name, "link", "set", "lo", "up"),
        ("-n", name, "link", "add", "br0", "type", "bridge"),
        ("-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb"),
        ("netns", "exec", name, "true"),   # needs mount-namespace unshare + /sys remount
    ]
    try:
        for step in steps:
            r = _ip(*step, check=False)
            if r.returncode != 0:
                err = r.stderr.strip() or f"exit {r.returncode}"
                return f"cannot use network namespaces here: `ip {' '.join(step)}`: {err}"
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot use network namespaces here: {e}"
    finally:
        _ip("netns", "del", name, check=False)


def _kill_netns_pids(ns: str, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process still inside namespace `ns`."""
    def pids() -> list[int]:
        r = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids():
            return


def cleanup_prefix(prefix: str) -> list[str]:
    """Kill processes in, then delete, every namespace whose name starts with `prefix`."""
    if not prefix.startswith(BASE):
        raise ValueError(f"refusing to clean namespaces outside {BASE}*: {prefix!r}")
    gone = [ns for ns in list_netns() if ns.startswith(prefix)]
    for ns in gone:
        _kill_netns_pids(ns)
    for ns in gone:
        _ip("netns", "del", ns, check=False)
    return gone


def cleanup_stale() -> list[str]:
    """Delete namespaces left by earlier runs of this module whose process is gone."""
    gone = []
    for ns in list_netns():
        m = _PREFIX_RE.match(ns)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue                      # that run is still alive: leave it alone
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        gone += cleanup_prefix(ns[: m.end()])
    return gone


def clean_env(env: dict | None = None, **extra: str) -> dict:
    """os.environ (or `env`) without proxy variables, plus `extra`: for commands in a namespace."""
    out = {k: v for k, v in (os.environ if env is None else env).items()
           if k.lower() not in _PROXY_VARS}
    out.update(extra)
    return out


class NetnsLab:
    """N emulated hosts on one bridge; a context manager that always tears down.

    hosts:  a count (names h0, h1, ...) or names ([a-z][a-z0-9_]*, at most 20 chars).
    subnet: addresses for host i is subnet[i+1]; default 10.231.0.0/24.
    prefix: namespace name prefix; default fcnt<pid>x<n>- (unique per process and lab).
    """

    def __init__(self, hosts: int | Sequence[str] = 2, subnet: str = DEFAULT_SUBNET,
                 prefix: str | None = None):
        names = [f"h{i}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"need distinct host names, got {names!r}")
        for n in names:
            if not _HOST_RE.match(n) or n == "hub":
                raise ValueError(f"bad host name {n!r}")
        net = ipaddress.ip_network(subnet)
        if not net.is_private or net.num_addresses < len(names) + 2:
            raise ValueError(f"subnet {subnet} must be private and hold {len(names)} hosts")
        self.prefix = prefix or f"{BASE}{os.getpid()}x{next(_counter)}-"
        if not self.prefix.startswith(BASE):
            raise ValueError(f"prefix must start with {BASE!r}")
        self.hosts: list[str] = names
        self.prefixlen = net.prefixlen
        self.addresses: dict[str, str] = {n: str(net[i + 1]) for i, n in enumerate(names)}
        self.hub = self.prefix + "hub"
        self._procs: list[subprocess.Popen] = []
        self._cut: dict[str, str] = {}
        self._up = False

    # -- names and addresses -------------------------------------------------
    def ns(self, host: str) -> str:
        """The namespace name of `host`."""
        self._check(host)
        return self.prefix + host

    def address(self, host: str) -> str:
        self._check(host)
        return self.addresses[host]

    def url(self, host: str, port: int, path: str = "") -> str:
        return f"http://{self.address(host)}:{port}{path}"

    def _check(self, host: str) -> None:
        if host not in self.addresses:
            raise KeyError(f"unknown host {host!r}; hosts are {self.hosts}")

    def _peer(self, host: str) -> str:
        return f"p{self.hosts.index(host)}"

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def up(self) -> Self:
        reason = netns_unavailable()
        if reason:
            raise NetnsError(reason)
        cleanup_stale()
        cleanup_prefix(self.prefix)          # leftovers of a crashed run with this prefix
        _open_labs.append(self)
        self._up = True
        try:
            hub = self.hub
            _ip("netns", "add", hub)
            _ip("-n", hub, "link", "set", "lo", "up")
            _ip("-n", hub, "link", "add", "br0", "type", "bridge", "stp_state", "0",
                "forward_delay", "0")
            _ip("-n", hub, "link", "set", "br0", "up")
            for host in self.hosts:
                ns, peer = self.ns(host), self._peer(host)
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # both veth ends are created directly in their namespaces
                _ip("-n", hub, "link", "add", peer, "type", "veth", "peer", "name", "eth0",
                    "netns", ns)
                _ip("-n", hub, "link", "set", peer, "master", "br0")
                _ip("-n", hub, "link", "set", peer, "up")
                _ip("-n", ns, "addr", "add", f"{self.addresses[host]}/{self.prefixlen}",
                    "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill every process started here and inside the namespaces, delete the namespaces."""
        for proc in self._procs:
            self.kill(proc)
        self._procs.clear()
        if self._up:
            cleanup_prefix(self.prefix)
            self._up = False
        with contextlib.suppress(ValueError):
            _open_labs.remove(self)

    # -- running things inside a host ------------------------------------------
    def cmd(self, host: str, argv: Sequence[str]) -> list[str]:
        """argv prefixed with `ip netns exec <ns>` (it execs argv: same pid)."""
        return [ip_binary() or "ip", "netns", "exec", self.ns(host), *map(str, argv)]

    def popen(self, host: str, argv: Sequence[str], env: dict | None = None,
              **kw) -> subprocess.Popen:
        """Start argv inside `host` in its own session; killed by kill()/close()."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.cmd(host, argv), env=clean_env(env), **kw)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], env: dict | None = None,
            timeout: float = 60, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run argv inside `host` to completion (output captured as text by default)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(host, argv), check=check, env=clean_env(env),
                              timeout=timeout, **kw)

    def python(self, host: str, code: str, *args: str, timeout: float = 60,
               env: dict | None = None) -> subprocess.CompletedProcess:
        return self.run(host, [sys.executable, "-c", code, *args], env=env, timeout=timeout)

    @staticmethod
    def kill(proc: subprocess.Popen, grace: float = 10) -> None:
        """SIGTERM the process group of `proc`, SIGKILL after `grace` seconds."""
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()

    # -- connectivity ------------------------------------------------------------
    def can_reach(self, src: str, dst: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connect from host `src` to `dst` (host name or IP) succeeds."""
        addr = self.addresses.get(dst, dst)
        code = ("import socket,sys\n"
                "try:\n"
                f" socket.create_connection(({addr!r},{int(port)}),timeout={timeout}).close()\n"
                "except OSError as e:\n"
                " sys.exit(str(e))\n")
        return self.python(src, code, timeout=timeout + 30).returncode == 0

    def http_get(self, src: str, url: str, timeout: float = 5.0,
                 headers: dict | None = None) -> tuple[int, str]:
        """GET `url` from inside `src`; (status, body) or (0, error text)."""
        code = ("import sys,urllib.request,urllib.error\n"
                f"req=urllib.request.Request({url!r},headers={dict(headers or {})!r})\n"
                "try:\n"
                f" r=urllib.request.urlopen(req,timeout={timeout}); s=r.status; b=r.read()\n"
                "except urllib.error.HTTPError as e:\n"
                " s=e.code; b=e.read()\n"
                "except OSError as e:\n"
                " s=0; b=str(e).encode()\n"
                "sys.stdout.write(str(s)+'\\n'+b.decode('utf-8','replace'))\n")
        r = self.python(src, code, timeout=timeout + 30)
        status, _, body = r.stdout.partition("\n")
        return (int(status), body) if status.isdigit() else (0, r.stderr)

    def wait_port(self, host: str, port: int, timeout: float = 30,
                  proc: subprocess.Popen | None = None) -> None:
        """Wait until something listens on `port` of `host` (checked from inside `host`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise NetnsError(f"process exited ({proc.returncode}) before {host}:{port} opened")
            if self.can_reach(host, host, port, timeout=1.0):
                return
            time.sleep(0.3)
        raise NetnsError(f"nothing listening on {host}:{port} after {timeout:.0f} s")

    def cut(self, host: str, side: str = "switch") -> None:
        """Disconnect `host` from the others.

        side="switch": down its bridge port (cable pulled; eth0 keeps its address but
        has no carrier, packets to/from it are dropped, connects time out).
        side="host": down eth0 inside the host (its address route goes away, its own
        connects fail at once with 'Network is unreachable').
        """
        if side == "switch":
            _ip("-n", self.hub, "link", "set", self._peer(host), "down")
        elif side == "host":
            _ip("-n", self.ns(host), "link", "set", "eth0", "down")
        else:
            raise ValueError("side must be 'switch' or 'host'")
        self._cut[host] = side

    def restore(self, host: str) -> None:
        """Undo cut(host) (both sides are brought up; waits until eth0 has carrier)."""
        _ip("-n", self.hub, "link", "set", self._peer(host), "up")
        _ip("-n", self.ns(host), "link", "set", "eth0", "up")
        self._cut.pop(host, None)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            state = _ip("-n", self.ns(host), "-o", "link", "show", "eth0").stdout
            if "LOWER_UP" in state and "NO-CARRIER" not in state:
                return
            time.sleep(0.05)
        raise NetnsError(f"eth0 of {host} did not come back up: {state.strip()}")

    def is_cut(self, host: str) -> bool:
        self._check(host)
        return host in self._cut


@contextlib.contextmanager
def lab_or_skip(hosts: int | Sequence[str] = 2, **kw) -> Iterator[NetnsLab]:
    """pytest helper: skip the test with netns_unavailable()'s reason, else yield a lab."""
    reason = netns_unavailable()
    if reason:
        import pytest
        pytest.skip(reason)
    with NetnsLab(hosts, **kw) as lab:
        yield lab


@atexit.register
def _close_open_labs() -> None:
    for lab in _open_labs.copy():  # close() removes from the list
        with contextlib.suppress(Exception):
            lab.close()


def _selftest() -> int:
    import tempfile

    reason = netns_unavailable()
    print("netns_unavailable():", reason)
    if reason:
        return 2
    port = 8123
    with tempfile.TemporaryDirectory() as tmp, NetnsLab(2) as lab:
        with open(os.path.join(tmp, "hello.txt"), "w") as f:
            f.write("hello from h0\n")
        print("prefix:", lab.prefix, "addresses:", lab.addresses)
        print("ip netns list:", [n for n in list_netns() if n.startswith(lab.prefix)])
        print(lab.run("h1", ["ip", "-brief", "addr"]).stdout.rstrip())
        srv = lab.popen("h0", [sys.executable, "-m", "http.server", str(port), "--bind",
                               "0.0.0.0", "--directory", tmp],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.wait_port("h0", port, proc=srv)
        url = lab.url("h0", port, "/hello.txt")
        checks = []

        def check(what: str, ok: bool, detail: str = "") -> None:
            checks.append(ok)
            print(f"{'PASS' if ok else 'FAIL'}  {what}  {detail}".rstrip())

        s, body = lab.http_get("h1", url)
        check(f"h1 GET {url}", s == 200 and "hello from h0" in body, f"-> {s} {body.strip()!r}")
        s, body = lab.http_get("h0", f"http://127.0.0.1:{port}/hello.txt")
        check("h0 GET its own 127.0.0.1 (lo up)", s == 200, f"-> {s}")
        check("h1's 127.0.0.1 is its own, not h0's", not lab.can_reach("h1", "127.0.0.1", port))
        for side in ("switch", "host"):
            lab.cut("h0", side=side)
            t = time.monotonic()
            s, body = lab.http_get("h1", url, timeout=2)
            check(f"cut(h0, side={side}): h1 GET fails", s == 0,
                  f"-> {body.strip()!r} after {time.monotonic() - t:.1f} s")
            lab.restore("h0")
            s, body = lab.http_get("h1", url)
            check("restore(h0): h1 GET works again", s == 200, f"-> {s}")
        r = lab.run("h1", ["ip", "route", "get", "192.0.2.1"])   # route lookup only, sends nothing
        routes = lab.run("h1", ["ip", "route"]).stdout.strip()
        check("no route out of the lab", r.returncode != 0 and "default" not in routes,
              f"-> `ip route`: {routes!r}; `ip route get 192.0.2.1`: {r.stderr.strip()!r}")
        prefix = lab.prefix
    left_ns = [n for n in list_netns() if n.startswith(prefix)]
    check("after close: no namespace left", not left_ns, f"ip netns list -> {list_netns()}")
    links = _ip("-brief", "link").stdout
    check("after close: root `ip -brief link` has no veth/bridge of ours",
          not re.search(r"^(p\d+|br0|eth0@)", links, re.MULTILINE), "\n" + links.rstrip())
    check("server process gone", srv.poll() is not None, f"-> returncode {srv.returncode}")
    print(f"{sum(checks)} passed, {len(checks) - sum(checks)} failed")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(_selftest())
