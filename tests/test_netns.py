"""The office harness itself (tests/harness/netns.py, canary.py): a network
namespace that reaches only its host address, and a canary that sees every
connection. Issue #13's office tests (tests/test_office.py) mean nothing
unless these hold: from the office, the harness upstream, its token server
and its CDN are out of reach while the mirror and its blob port are not.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import requests

from tests.harness import netns
from tests.harness.canary import Canary
from tests.harness.mirror import Mirror
from tests.harness.netns import Office

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=netns.available() or "")

# A process inside the office connects to HOST:PORT and prints "open" or the error.
PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("open")
except OSError as exc:
    print(type(exc).__name__)
"""


def listening_socket(host: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen()
    return sock


def probe_from_process(office: Office, host: str, port: int) -> str:
    proc = office.run([sys.executable, "-c", PROBE, host, str(port)], capture_output=True, text=True,
                      timeout=30, check=True)
    return proc.stdout.strip()


def host_state() -> tuple[str, str]:
    netns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return netns_list, links


def assert_gone(office: Office) -> None:
    netns_list, links = host_state()
    assert office.name not in netns_list
    assert office.host_veth not in links


def test_the_office_reaches_its_host_address_and_nothing_on_the_hosts_loopback():
    with Office() as office, listening_socket("127.0.0.1") as on_loopback, \
            listening_socket(office.host_address) as on_veth:
        loopback_port = on_loopback.getsockname()[1]
        veth_port = on_veth.getsockname()[1]
        # The host itself reaches both (the servers are up).
        socket.create_connection(("127.0.0.1", loopback_port), timeout=5).close()
        socket.create_connection((office.host_address, veth_port), timeout=5).close()
        for probe in (office.reachable, lambda h, p: probe_from_process(office, h, p)):
            # 127.0.0.1 inside is the office's own loopback: the host's server is not there.
            assert probe("127.0.0.1", loopback_port) == "ConnectionRefusedError"
            # Nor is it behind the host address (it is bound to the host's loopback only).
            assert probe(office.host_address, loopback_port) == "ConnectionRefusedError"
            assert probe(office.host_address, veth_port) == "open"
        # No route anywhere else (this machine's own eth0 address included).
        assert "unreachable" in office.reachable("192.0.2.1", 9).lower()
        # A process inside sees the office's interfaces, not the host's.
        addrs = office.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        assert f"{office.address}/24" in addrs and "127.0.0.1/8" in addrs
        assert office.host_address not in addrs and office.office_veth in addrs
    assert_gone(office)


def test_the_office_is_removed_with_what_runs_inside_when_the_test_fails():
    office = Office()
    with pytest.raises(RuntimeError, match="the test failed"):
        with office:
            sleeper = office.popen(["sleep", "600"])
            raise RuntimeError("the test failed")
    assert sleeper.wait(10) == -9  # killed by the office's cleanup
    assert_gone(office)


def test_offices_side_by_side_get_their_own_names_and_subnets():
    with Office() as a, Office() as b:
        assert a.name != b.name and a.host_veth != b.host_veth
        assert not a.subnet.overlaps(b.subnet)
        with listening_socket(b.host_address) as on_b:
            # a's routes know nothing of b's subnet.
            assert "unreachable" in a.reachable(b.host_address, on_b.getsockname()[1]).lower()
            assert b.reachable(b.host_address, on_b.getsockname()[1]) == "open"
    assert_gone(a)
    assert_gone(b)


def test_from_the_office_only_the_mirror_is_reachable(tmp_path, upstream_redirect, pushed_images):
    """The upstream's front door, distribution itself, its token server and its
    CDN listen on the host's 127.0.0.1: the office reaches none of them, while
    the mirror (listening on the office's host address) and its blob port answer."""
    u = upstream_redirect
    with Office() as office, Mirror(tmp_path / "mirror", [f"reverse:{u.url}"],
                                    listen_host=office.host_address) as mirror:
        assert mirror.url == f"http://{office.host_address}:{mirror.ports[0]}"
        upstream_ports = {
            "front door": u._frontdoor.port, "registry": int(u.registry_url.rsplit(":", 1)[1]),
            "token server": int(u.tokens.url.rsplit(":", 1)[1]), "CDN": u._cdn.port,
        }
        for what, port in upstream_ports.items():
            for host in ("127.0.0.1", office.host_address):
                assert office.reachable(host, port) == "ConnectionRefusedError", (what, host)
        assert office.reachable(office.host_address, mirror.ports[0]) == "open"
        assert office.reachable(office.host_address, mirror.blob_port) == "open"

        # An HTTP client in the office gets the registry's answer through the mirror.
        proc = office.run([sys.executable, "-c",
                           "import sys, urllib.request, urllib.error\n"
                           "try: urllib.request.urlopen(sys.argv[1], timeout=10)\n"
                           "except urllib.error.HTTPError as e: print(e.code, e.headers['WWW-Authenticate'])",
                           mirror.url + "/v2/"], capture_output=True, text=True, timeout=30, check=True)
        status, challenge = proc.stdout.strip().split(" ", 1)
        assert status == "401" and challenge.startswith("Bearer realm=")
        assert any(r.path == "/v2/" for r in u.counters.requests)

        # The 307s the mirror gives office clients name the blob server at the
        # address they came to (the blob server follows the proxy's listen address).
        image = pushed_images.alpine
        token = requests.get(u.token_realm, params={"service": u.service,
                                                     "scope": f"repository:{image.repo}:pull"}).json()["token"]
        digest = image.layers[0][0]
        answer = requests.get(f"{mirror.url}/v2/{image.repo}/blobs/{digest}",
                              headers={"Authorization": f"Bearer {token}"}, allow_redirects=False, timeout=30)
        assert answer.status_code == 307
        assert answer.headers["Location"].startswith(f"http://{office.host_address}:{mirror.blob_port}/")
    assert_gone(office)


def test_the_canary_sees_the_mirror_connect_wherever_it_listens(tmp_path, upstream):
    """The tamper test's witness can fail: a regular-mode (proxy) request to a
    canary address makes the mirror connect, and the canary records it, on
    the host's loopback, on the office's host address and inside the office."""
    with Office() as office, Canary() as canary, \
            Mirror(tmp_path / "mirror", [f"reverse:{upstream.url}", "regular"],
                   listen_host=office.host_address) as mirror:
        on_loopback = canary.listen("127.0.0.1")
        on_host_address = canary.listen(office.host_address)
        in_office = canary.listen(office.address, office=office)
        canary.assert_untouched(grace=0)
        proxies = {"http": mirror.url_of(1)}
        for n, address in enumerate((on_loopback, on_host_address, in_office), start=1):
            answer = requests.get(f"http://{address}/token?n={n}", proxies=proxies, timeout=30)
            assert answer.status_code == 200 and answer.json()["token"] == "canary"
            visits = canary.wait_visits(n, timeout=10)
            assert visits[-1].listener == address
            assert visits[-1].head.startswith(f"GET /token?n={n} HTTP/1.1".encode())
        with pytest.raises(AssertionError, match="the canary was reached"):
            canary.assert_untouched(grace=0)
    assert_gone(office)
