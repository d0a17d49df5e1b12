"""scripts/prefetch.py end to end: the script in a subprocess, pulling through a
real mirror (mitmdump with the addon, its own store per test) from the real
upstream (distribution behind token auth, with counters).

What "warmed" means is checked from the upstream's side: after a prefetch, a
client pulling the same images through the mirror costs zero upstream blob
bytes. One extra test uses three tiny local servers instead of the mirror, to
see exactly which headers reach the token realm and the blob-port redirect
target.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.harness._http import LoopbackHTTPServer
from tests.harness.fresh import fresh_image, unique_seed
from tests.harness.mirror import Mirror
from tests.harness.upstream import ALICE
from tests.harness.v2client import RegistryClient

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prefetch.py"
WAIT = 60


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and k != "REGISTRY_PASSWORD"}
    env.update(extra)
    return env


def prefetch(mirror_url: str, *args: str, input: str | None = None, env: dict | None = None,
             expect: int | None = 0, netns: str | None = None) -> subprocess.CompletedProcess:
    """Run the script to completion (bounded); stdout is a pipe, not a terminal.
    `netns`: run it in that network namespace (another machine on the LAN)."""
    where = ["ip", "netns", "exec", netns] if netns else []
    proc = subprocess.run([*where, sys.executable, str(SCRIPT), "--mirror", mirror_url, *args],
                          input=input or "", capture_output=True, text=True, timeout=WAIT * 2,
                          env=env or _env(), cwd=ROOT)
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    # Not a terminal: plain lines only, no progress-bar control characters.
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and "\x1b" not in stream
    return proc


def summary_line(proc: subprocess.CompletedProcess, key: str) -> str:
    """The value of a summary line, e.g. summary_line(p, "images") -> "2 ok, 0 failed"."""
    for line in proc.stdout.splitlines():
        if line.strip().startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {key!r} summary line in:\n{proc.stdout}")


def digests_of(*images) -> list[str]:
    return [d for image in images for d, _ in image.blobs]


def mirror_says_hit(mirror: Mirror, repo: str, digest: str) -> bool:
    """Whether this mirror marks blob HEADs answered from its store (X-Registry-Cache: hit)."""
    client = RegistryClient(mirror.url)
    client.head_manifest(repo, "latest")  # a token for the repository
    r = client.request("HEAD", f"/v2/{repo}/blobs/{digest}", allow_redirects=False)
    return r.status_code == 200 and r.headers.get("X-Registry-Cache") == "hit"


# ---------------------------------------------------------------------------- warming
def test_prefetched_images_are_pulled_without_upstream_blob_bytes(upstream, mirror, pushed_images):
    alpine, multi = pushed_images.alpine, pushed_images.multi
    arm64 = multi.images[("linux", "arm64", "v8")]
    amd64 = multi.images[("linux", "amd64")]
    proc = prefetch(mirror.url, "--platform", "linux/arm64/v8", "alpine", f"docker.io/{multi.ref}")
    assert summary_line(proc, "images") == "2 ok, 0 failed"
    assert summary_line(proc, "layers") == f"{len(alpine.layers) + len(arm64.layers)} fetched, 0 already cached"
    assert summary_line(proc, "configs") == "2 fetched, 0 already cached"
    fetched = alpine.blob_bytes + arm64.blob_bytes
    assert summary_line(proc, "bytes fetched").split("(")[1].startswith(f"{fetched} bytes")
    # One upstream copy of each wanted blob, nothing of the platform not asked for.
    assert upstream.counters.blob_bytes == fetched
    assert all(upstream.counters.blob_bytes_for(d) == 0 for d in digests_of(amd64))
    mirror.wait_stored(digests_of(alpine, arm64), WAIT)

    upstream.reset_counters()
    client = RegistryClient(mirror.url)
    assert client.pull(alpine.repo, alpine.tag).layers == alpine.layers
    result = client.pull(multi.repo, multi.tag, platform=("linux", "arm64", "v8"))
    assert result.manifest_digest == arm64.digest and result.layers == arm64.layers
    assert upstream.counters.blob_bytes == 0 and upstream.counters.blob_gets == 0


@pytest.mark.allow_skip  # on a machine that is neither amd64 nor arm64
def test_default_platform_is_this_machines(upstream, mirror, pushed_images):
    import platform
    if platform.machine() not in ("x86_64", "amd64"):
        pytest.skip("the multi image has linux/amd64 and linux/arm64/v8; this test assumes amd64")
    multi = pushed_images.multi
    proc = prefetch(mirror.url, multi.ref)
    assert "linux/amd64" in proc.stdout and "linux/arm64" not in proc.stdout
    assert upstream.counters.blob_bytes == multi.images[("linux", "amd64")].blob_bytes


def test_all_platforms_fetches_every_platform(upstream, mirror, pushed_images):
    multi = pushed_images.multi
    proc = prefetch(mirror.url, "--all-platforms", multi.ref)
    assert summary_line(proc, "layers") == "2 fetched, 0 already cached"
    assert upstream.counters.blob_bytes == sum(image.blob_bytes for image in multi.images.values())
    mirror.wait_stored(digests_of(*multi.images.values()), WAIT)
    upstream.reset_counters()
    for platform, image in multi.images.items():
        assert RegistryClient(mirror.url).pull(multi.repo, multi.tag, platform=platform).layers == image.layers
    assert upstream.counters.blob_bytes == 0


def test_image_list_file_with_comments(upstream, mirror, pushed_images, tmp_path):
    alpine, schema2, dockerlist = pushed_images.alpine, pushed_images.schema2, pushed_images.dockerlist
    arm = dockerlist.images[("linux", "arm", "v7")]
    images = tmp_path / "images.txt"
    images.write_text(
        "# nightly warm-up list\n"
        "\n"
        f"   {alpine.repo}:{alpine.tag}   # indented, with a comment\n"
        "# library/not-this-one:1\n"
        f"{schema2.ref}\n"
        f"docker.io/{dockerlist.ref}\n"
        "\n"
    )
    proc = prefetch(mirror.url, "--file", str(images), "--platform", "linux/arm")  # arm means arm/v7
    assert summary_line(proc, "images") == "3 ok, 0 failed"
    assert "not-this-one" not in proc.stdout + proc.stderr
    assert upstream.counters.blob_bytes == alpine.blob_bytes + schema2.blob_bytes + arm.blob_bytes
    mirror.wait_stored(digests_of(alpine, schema2, arm), WAIT)
    upstream.reset_counters()
    RegistryClient(mirror.url).pull(schema2.repo, schema2.tag)
    RegistryClient(mirror.url).pull(dockerlist.repo, dockerlist.tag, platform=("linux", "arm", "v7"))
    assert upstream.counters.blob_bytes == 0


def test_pinned_digest(upstream, mirror, pushed_images):
    image = pushed_images.schema2
    proc = prefetch(mirror.url, f"{image.repo}@{image.digest}")
    assert summary_line(proc, "images") == "1 ok, 0 failed"
    assert upstream.counters.blob_bytes == image.blob_bytes


def test_failed_images_are_reported_and_the_others_still_warmed(upstream, mirror, pushed_images):
    alpine, schema2 = pushed_images.alpine, pushed_images.schema2
    proc = prefetch(mirror.url, alpine.ref, "library/doesnotexist:1", "registry.invalid/foo/bar:1",
                    "Not/A/Reference", schema2.ref, expect=1)
    assert summary_line(proc, "images") == "2 ok, 3 failed"
    errors = proc.stderr.splitlines()
    assert any(e.startswith("FAILED library/doesnotexist:1: manifest 1: not found (HTTP 404") for e in errors), errors
    assert any(e.startswith("FAILED Not/A/Reference: not an image reference") for e in errors), errors
    # Another registry is asked for with containerd's ?ns=; this one is not on
    # the mirror's registries list.
    assert "FAILED registry.invalid/foo/bar:1: the mirror refused registry registry.invalid (HTTP 403" \
        in proc.stderr, errors
    assert upstream.counters.blob_bytes == alpine.blob_bytes + schema2.blob_bytes
    for line in ("FAILED library/doesnotexist:1", "FAILED registry.invalid/foo/bar:1"):
        assert line in proc.stdout  # listed again in the summary


def test_a_blob_the_mirror_did_not_keep_fails_its_image_at_once(upstream, tmp_path):
    """A layer larger than the store is served but not stored: a nightly
    warm-up that warms nothing must not report success. The blob port says so
    with the bytes (X-Registry-Cache: miss, not stored), so the run does not
    wait --keep-wait for a commit that will not come."""
    image = fresh_image(upstream, 3_000_000)
    layer, _ = image.layers[0]
    with Mirror(tmp_path / "mirror", [f"reverse:{upstream.url}"], options={"cache_size": "2m"}) as mirror:
        # --keep-wait longer than prefetch() waits for the script: only the mirror's word ends it.
        proc = prefetch(mirror.url, "--keep-wait", "600", image.ref, expect=1)
        mirror.wait_for_log(rf"fill: served {layer} .* did not store it", WAIT)
        mirror.wait_for_log(rf"registry-cache: GET {image.repo} blob {layer} miss ", WAIT)
        heads = re.findall(rf"registry-cache: HEAD {image.repo} blob {layer} ", mirror.log_text())
    assert len(heads) == 1  # the one before the download; none asking whether it was stored
    assert summary_line(proc, "images") == "0 ok, 1 failed"
    assert f"FAILED {image.ref}: the mirror served but did not keep 1 blob(s) ({layer[:19]})" in proc.stderr, \
        proc.stderr
    assert "but the mirror did not keep it (it said so: X-Registry-Cache: miss, not stored)" in proc.stderr


def test_a_blob_the_mirror_never_confirms_fails_after_keep_wait():
    """A mirror that says nothing about keeping a blob (an older one, or a disk
    that filled mid-download) is asked until --keep-wait passes."""
    recorder = _Recorder(confirm=False)
    for server in recorder.servers.values():
        server.start()
    try:
        proc = prefetch(recorder.servers["mirror"].url, "--keep-wait", "1", "acme/app:v1", expect=1)
    finally:
        for server in recorder.servers.values():
            server.stop()
    assert "FAILED acme/app:v1: the mirror served but did not keep 2 blob(s)" in proc.stderr, proc.stderr
    assert "but the mirror did not keep it\n" in proc.stderr and "it said so" not in proc.stderr
    heads = [r for r in recorder.seen["mirror"] if r["method"] == "HEAD"]
    assert len(heads) > 2 * 2  # asked again and again, for each of the two blobs


def test_another_registry_goes_through_the_mirror_with_ns(upstream, second, tmp_path):
    image = fresh_image(second, 500_000, repo=f"org/app{unique_seed()}")
    options = {"registries": f"{second.host_port}={second.url}"}
    with Mirror(tmp_path / "mirror", [f"reverse:{upstream.url}"], options=options) as mirror:
        name = f"{second.host_port}/{image.ref}"
        proc = prefetch(mirror.url, name)
        assert f"ok {name}: " in proc.stdout
        assert second.counters.blob_bytes == image.blob_bytes and upstream.counters.blob_bytes == 0
        assert not any("ns=" in r.path for r in second.counters.requests)  # the mirror took it off
        mirror.wait_stored(digests_of(image), WAIT)
        second.reset_counters()
        # containerd's pull of that image (same ns) is served from the store.
        RegistryClient(mirror.url, query={"ns": second.host_port}).pull(image.repo, image.tag)
        assert second.counters.blob_bytes == 0


def test_unknown_platform_fails_only_when_nothing_matches(upstream, mirror, pushed_images):
    multi = pushed_images.multi
    proc = prefetch(mirror.url, "--platform", "linux/s390x", multi.ref, expect=1)
    assert "no manifest for linux/s390x in the index (it has linux/amd64, linux/arm64/v8)" in proc.stderr
    proc = prefetch(mirror.url, "--platform", "linux/s390x", "--platform", "linux/arm64", multi.ref)
    assert summary_line(proc, "platforms not in their image's index") == "1"
    assert upstream.counters.blob_bytes == multi.images[("linux", "arm64", "v8")].blob_bytes


def test_second_run_fetches_nothing_from_the_upstream(upstream, mirror, pushed_images):
    alpine, multi = pushed_images.alpine, pushed_images.multi
    arm64 = multi.images[("linux", "arm64", "v8")]
    args = ("--platform", "linux/arm64/v8", alpine.ref, multi.ref)
    prefetch(mirror.url, *args)
    mirror.wait_stored(digests_of(alpine, arm64), WAIT)
    upstream.reset_counters()
    proc = prefetch(mirror.url, *args)
    assert summary_line(proc, "images") == "2 ok, 0 failed"
    assert upstream.counters.blob_bytes == 0 and upstream.counters.blob_gets == 0
    if mirror_says_hit(mirror, alpine.repo, alpine.layers[0][0]):
        # The mirror marks its store's answers: nothing was even downloaded from it.
        assert summary_line(proc, "layers") == f"0 fetched, {len(alpine.layers) + len(arm64.layers)} already cached"
        assert summary_line(proc, "configs") == "0 fetched, 2 already cached"
        assert summary_line(proc, "bytes fetched").startswith("0 B")
        assert f"ok {alpine.ref}: already cached" in proc.stdout


def test_private_image_needs_credentials(upstream, mirror, pushed_images):
    image = pushed_images.private
    proc = prefetch(mirror.url, image.ref, expect=1)
    assert f"FAILED {image.ref}: manifest latest: not authorized" in proc.stderr
    assert "--username" in proc.stderr
    proc = prefetch(mirror.url, "--username", "alice", "--password-stdin", image.ref, input="wrong\n", expect=1)
    assert "refused the credentials of 'alice'" in proc.stderr
    assert upstream.counters.blob_bytes == 0
    prefetch(mirror.url, "--username", ALICE[0], "--password-stdin", image.ref, input=ALICE[1] + "\n")
    assert upstream.counters.blob_bytes == image.blob_bytes
    mirror.wait_stored(digests_of(image), WAIT)
    upstream.reset_counters()
    proc = prefetch(mirror.url, "--username", ALICE[0], image.ref, env=_env(REGISTRY_PASSWORD=ALICE[1]))
    assert upstream.counters.blob_bytes == 0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_prints_a_partial_summary_and_the_mirror_finishes(upstream, mirror, sig, code):
    image = fresh_image(upstream, 4_000_000)
    digest, size = image.layers[0]
    upstream.set_fault(digest, "stall", times=1)  # half the layer, then the upstream waits
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--mirror", mirror.url, image.ref],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        upstream.wait_stalled(1, WAIT, digest=digest)  # the prefetch is in the middle of the layer
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert proc.returncode == code, stdout + stderr
    assert "Traceback" not in stderr
    assert f"Interrupted while warming {image.ref}" in stdout
    assert "Summary (interrupted: partial)" in stdout
    # The client is gone; the fill it started completes on its own.
    upstream.release_stalls()
    mirror.wait_for_log(rf"fill: stored {digest}", WAIT)
    assert upstream.counters.blob_bytes_for(digest) == size
    upstream.reset_counters()
    proc = prefetch(mirror.url, image.ref)
    assert summary_line(proc, "images") == "1 ok, 0 failed"
    assert upstream.counters.blob_bytes == 0


def test_terminal_output_has_a_progress_bar(upstream, mirror):
    image = fresh_image(upstream, 3_000_000)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--mirror", mirror.url, image.ref],
                            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=_env(), cwd=ROOT)
    os.close(terminal)
    chunks: list[bytes] = []

    def read_all():
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    try:
        assert proc.wait(WAIT) == 0
        reader.join(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    output = b"".join(chunks).decode()
    size = image.layers[0][1]
    # A live bar was drawn (not just the terminal's \r\n line ends)...
    assert re.search(r"\r  layer  sha256:[0-9a-f]{12} \[[#-]{10,30}\] +\d+% .*/s\x1b\[K", output), repr(output)
    assert f"{size / 1024 / 1024:.1f} MiB" in output
    assert "Summary" in output and "1 ok, 0 failed" in output  # ...and the summary follows


# ---------------------------------------------------------------------------- credentials
CAROL = b"carol:carol-secret"


class _Recorder:
    """Three loopback servers in the roles the real ones play: the mirror, its
    blob port (where the mirror's 307s point) and the upstream's token realm."""

    def __init__(self, confirm: bool = True, host: str = "127.0.0.1", basic: bool = False):
        self.confirm = confirm  # the mirror's HEADs say "hit" once the blob port served a blob
        self.basic = basic  # the registry behind the mirror asks for Basic auth, not for a token
        self.layer = os.urandom(300_000)
        self.config = b"{}"
        self.digest = "sha256:" + hashlib.sha256(self.layer).hexdigest()
        self.config_digest = "sha256:" + hashlib.sha256(self.config).hexdigest()
        self.seen: dict[str, list[dict]] = {"mirror": [], "blobport": [], "realm": []}
        self.served: set[str] = set()  # digests the blob port sent
        self.servers = {name: LoopbackHTTPServer(self._handler(name), name=name, host=host) for name in self.seen}

    def _handler(self, role: str):
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", headers=None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                recorder.seen[role].append({"path": self.path, "method": self.command,
                                            **{k.lower(): v for k, v in self.headers.items()}})
                getattr(recorder, role)(self)

        return Handler

    def mirror(self, h):
        if self.basic and h.headers.get("Authorization") != "Basic " + base64.b64encode(CAROL).decode():
            return h._send(401, b"{}", {"WWW-Authenticate": 'Basic realm="registry"'})
        if not self.basic and h.headers.get("Authorization") != "Bearer good-token":
            realm = self.servers["realm"].url + "/token"
            return h._send(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake",'
                                                            f'scope="repository:acme/app:pull"'})
        if "/manifests/" in h.path:
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": self.config_digest, "size": len(self.config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": self.digest, "size": len(self.layer)}],
            }).encode()
            return h._send(200, manifest, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        digest = h.path.rsplit("/", 1)[1]
        if h.command == "HEAD":  # a hit once the blob port has served it, as the real mirror does
            hit = {"X-Registry-Cache": "hit"} if self.confirm and digest in self.served else {}
            return h._send(200, b"", {"Docker-Content-Digest": digest, **hit})
        h._send(307, b"", {"Location": f"{self.servers['blobport'].url}/blobs/{digest}?sig=x"})

    def blobport(self, h):
        digest = h.path.split("/blobs/")[1].split("?")[0]
        h._send(200, self.layer if digest == self.digest else self.config)
        self.served.add(digest)

    def realm(self, h):
        h._send(200, json.dumps({"token": "good-token", "expires_in": 300}).encode(),
                {"Content-Type": "application/json"})


def test_password_goes_only_to_the_realm_and_nothing_to_the_blob_port():
    recorder = _Recorder()
    for server in recorder.servers.values():
        server.start()
    try:
        proc = prefetch(recorder.servers["mirror"].url, "--username", "carol", "acme/app:v1",
                        env=_env(REGISTRY_PASSWORD="carol-secret"))
    finally:
        for server in recorder.servers.values():
            server.stop()
    assert summary_line(proc, "layers") == "1 fetched, 0 already cached"
    basic = "Basic " + base64.b64encode(b"carol:carol-secret").decode()
    assert [r.get("authorization") for r in recorder.seen["realm"]] == [basic]
    assert {r.get("authorization") for r in recorder.seen["mirror"]} <= {None, "Bearer good-token"}
    assert len(recorder.seen["blobport"]) == 2  # config and layer, each redirected
    assert not any("authorization" in r for r in recorder.seen["blobport"])


def test_a_broken_transfer_is_tried_again(upstream, mirror):
    image = fresh_image(upstream, 2_000_000)
    digest, size = image.layers[0]
    upstream.set_fault(digest, "corrupt", times=1)  # the first fill fails (a cut one would resume)
    proc = prefetch(mirror.url, image.ref)
    # Seen as a cut transfer, or (when the fill failed before the redirect was
    # followed) as the blob port no longer having the blob; either way, again.
    assert f"layer  {digest[:19]}  " in proc.stdout and "trying again" in proc.stdout, proc.stdout
    assert summary_line(proc, "images") == "1 ok, 0 failed"
    mirror.wait_for_log(rf"fill: stored {digest}", WAIT)


def test_an_unreachable_blob_port_is_named(upstream, upstream_session, tmp_path, closed_port, pushed_images):
    # As when a firewall lets clients reach the mirror's port but not its blob port.
    options = {"blob_url": f"http://{closed_port}"}
    with Mirror(tmp_path / "mirror", [f"reverse:{upstream_session.url}"], options=options) as mirror:
        proc = prefetch(mirror.url, pushed_images.schema2.ref, expect=1)
    assert f"cannot connect to {closed_port} (the mirror's blob port): [Errno 111] Connection refused" \
        in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------- the network
@pytest.fixture
def office():
    """Another machine on the LAN: a network namespace joined to this one by a
    veth pair, with addresses of its own (198.18.0.0/15 is for tests like this
    one; one /30 per process). Servers listen on `office.lan`, this side's
    address: plain HTTP to it crosses the "network", not loopback."""
    pid = os.getpid()
    name, here, there = f"rcoci-{pid}", f"rcoci{pid}a", f"rcoci{pid}b"
    base = (198 << 24) | (18 << 16) | ((pid % 32768) * 4)
    lan, peer = (".".join(str((base + n) >> s & 255) for s in (24, 16, 8, 0)) for n in (1, 2))

    def ip(*args, ns=None):
        subprocess.run(["ip", *(["-n", ns] if ns else []), *args], check=True, capture_output=True, timeout=30)

    ip("netns", "add", name)
    try:
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", name)
        ip("addr", "add", f"{lan}/30", "dev", here)
        ip("link", "set", here, "up")
        ip("addr", "add", f"{peer}/30", "dev", there, ns=name)
        ip("link", "set", there, "up", ns=name)
        ip("link", "set", "lo", "up", ns=name)
        yield type("Office", (), {"name": name, "lan": lan})
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _started(recorder: _Recorder) -> _Recorder:
    for server in recorder.servers.values():
        server.start()
    return recorder


def _stopped(recorder: _Recorder) -> None:
    for server in recorder.servers.values():
        server.stop()


def test_a_password_crosses_plain_http_to_another_machine_only_with_insecure_auth(office):
    """One rule for the mirror and the token realm: the password goes over
    HTTPS, or to this machine, and over plain HTTP to another one (a mirror on
    the LAN) only when --insecure-auth says so."""
    password = _env(REGISTRY_PASSWORD="carol-secret")
    basic = "Basic " + base64.b64encode(CAROL).decode()
    # A registry that asks for Basic auth, behind a plain-HTTP mirror on the LAN
    recorder = _started(_Recorder(host=office.lan, basic=True))
    try:
        mirror = recorder.servers["mirror"]
        proc = prefetch(mirror.url, "--username", "carol", "acme/app:v1", env=password, netns=office.name, expect=1)
        assert (f"FAILED acme/app:v1: refusing to send the password over plain HTTP to the mirror "
                f"({mirror.host_port}), where anyone on the network can read it; --insecure-auth allows it") \
            in proc.stderr, proc.stderr
        assert recorder.seen["mirror"] and not any("authorization" in r for r in recorder.seen["mirror"])
        proc = prefetch(mirror.url, "--username", "carol", "--insecure-auth", "acme/app:v1", env=password,
                        netns=office.name)
        assert summary_line(proc, "layers") == "1 fetched, 0 already cached"
        assert {r.get("authorization") for r in recorder.seen["mirror"]} == {None, basic}
        assert not any("authorization" in r for r in recorder.seen["blobport"])
    finally:
        _stopped(recorder)
    # A plain-HTTP token realm on the LAN
    recorder = _started(_Recorder(host=office.lan))
    try:
        mirror, realm = recorder.servers["mirror"], recorder.servers["realm"]
        proc = prefetch(mirror.url, "--username", "carol", "acme/app:v1", env=password, netns=office.name, expect=1)
        assert (f"refusing to send the password over plain HTTP to the token realm ({realm.host_port})"
                in proc.stderr), proc.stderr
        assert recorder.seen["realm"] == []
        proc = prefetch(mirror.url, "--username", "carol", "--insecure-auth", "acme/app:v1", env=password,
                        netns=office.name)
        assert summary_line(proc, "layers") == "1 fetched, 0 already cached"
        assert [r.get("authorization") for r in recorder.seen["realm"]] == [basic]
        # Anonymous pulls were never affected: no password, nothing to refuse.
        prefetch(mirror.url, "acme/app:v1", netns=office.name)
    finally:
        _stopped(recorder)


@pytest.fixture
def https_upstream(upstream_https):
    """The HTTPS upstream (its token server too), behind a CA of its own."""
    upstream_https.set_down(False)
    upstream_https.clear_faults()
    upstream_https.redirect_blobs = False
    upstream_https.reset_counters()
    return upstream_https


def test_a_mirror_with_a_private_ca_given_by_ca_or_the_environment(https_upstream, tmp_path):
    """A mirror (and so its token relay) served over TLS whose certificate
    comes from a CA only the options or the environment name."""
    ca = str(https_upstream.ca_cert_path)
    image = fresh_image(https_upstream, 300_000, verify=ca)
    with Mirror(tmp_path / "mirror", [f"reverse:{https_upstream.url}"],
                options={"ssl_verify_upstream_trusted_ca": ca}) as mirror:
        # Plain HTTP: the token comes through the mirror's relay, which trusts the upstream's CA.
        proc = prefetch(mirror.url, image.ref)
        assert summary_line(proc, "images") == "1 ok, 0 failed"
        mirror_ca = str(mirror.ca_cert)  # mitmproxy's own, for clients that speak TLS to it
        secure = mirror.url.replace("http://", "https://")
        proc = prefetch(secure, image.ref, expect=1)
        assert "TLS certificate verify failed" in proc.stderr and "--ca FILE" in proc.stderr, proc.stderr
        proc = prefetch(secure, "--ca", mirror_ca, image.ref)
        assert summary_line(proc, "images") == "1 ok, 0 failed"
        for variable in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            proc = prefetch(secure, image.ref, env=_env(**{variable: mirror_ca}))
            assert summary_line(proc, "images") == "1 ok, 0 failed", variable
        # Behind an HTTPS proxy (mitmproxy passing TLS through untouched, as a CONNECT proxy does).
        with Mirror(tmp_path / "proxy", ["regular"], options={"ignore_hosts": ".*"}) as proxy:
            proc = prefetch(secure, "--ca", mirror_ca, image.ref, env=_env(HTTPS_PROXY=proxy.url))
            assert summary_line(proc, "images") == "1 ok, 0 failed"
            proxy.wait_for_log(rf"server connect {re.escape(mirror.host_port)}\b", WAIT)
    proc = prefetch("http://127.0.0.1:1", "--ca", "/nonexistent", "alpine", expect=2)
    assert "cannot use the CA certificates in /nonexistent: No such file or directory" in proc.stderr
