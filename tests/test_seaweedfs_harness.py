"""The SeaweedFS harness itself: it runs the real weed, on loopback only, checks
signatures, breaks on demand, and leaves nothing behind."""

from __future__ import annotations

import glob
import os
import socket
import threading

import boto3
import botocore.exceptions
import pytest
import requests

from tests.harness.seaweedfs import SeaweedFS


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process pid listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                hex_addr, hex_port = local.split(":")
                raw = bytes.fromhex(hex_addr)
                if family == socket.AF_INET:
                    addr = socket.inet_ntop(family, raw[::-1])
                else:  # four little-endian 32-bit words
                    addr = socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                found.add((addr, int(hex_port, 16)))
    return found


def test_weed_on_loopback_checks_signatures_and_cleans_up():
    store = SeaweedFS()
    store.start()
    try:
        pid, workdir, ports = store._proc.pid, store.workdir, dict(store.ports)
        listening = _listening_addresses(pid)
        assert listening, "weed listens on nothing?"
        assert {addr for addr, _ in listening} == {"127.0.0.1"}, listening
        assert {port for _, port in listening} <= set(ports.values()), (listening, ports)

        client = store.client()
        client.put_object(Bucket=store.bucket, Key="hello", Body=b"world")
        assert client.get_object(Bucket=store.bucket, Key="hello")["Body"].read() == b"world"
        # Neither an anonymous request nor a wrong secret reads it.
        assert requests.get(f"{store.endpoint}/{store.bucket}/hello", timeout=10).status_code == 403
        forger = boto3.client("s3", endpoint_url=store.endpoint, region_name=store.region,
                              aws_access_key_id=store.access_key, aws_secret_access_key="wrong")
        with pytest.raises(botocore.exceptions.ClientError) as denied:
            forger.get_object(Bucket=store.bucket, Key="hello")
        assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

        store.restart()  # same ports, same data
        assert store.ports == ports
        assert client.get_object(Bucket=store.bucket, Key="hello")["Body"].read() == b"world"
    finally:
        store.stop()
    assert store._proc.poll() is not None
    assert not os.path.exists(workdir)
    for port in ports.values():
        assert not glob.glob(f"/tmp/seaweedfs-*-{port}.sock")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ports["s3"]), timeout=2).close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", store.front.port), timeout=2).close()


@pytest.fixture(scope="module")
def store():
    with SeaweedFS() as s:
        yield s


def _status(store, key: str, timeout: float = 2) -> str:
    """'ok', or the kind of failure a client with this timeout meets."""
    client = store.client(connect_timeout=timeout, read_timeout=timeout)
    try:
        client.head_object(Bucket=store.bucket, Key=key)
        return "ok"
    except botocore.exceptions.ReadTimeoutError:
        return "timeout"
    except botocore.exceptions.EndpointConnectionError:
        return "refused"
    except botocore.exceptions.ConnectionClosedError:
        return "reset"
    except botocore.exceptions.ClientError as exc:
        return str(exc.response["ResponseMetadata"]["HTTPStatusCode"])


# A reset right after the accept reaches botocore as a reset, or (when it
# comes before the request is sent) as a connection error.
@pytest.mark.parametrize("how, failures, accepted", [
    ("refuse", {"refused"}, False), ("reset", {"reset", "refused"}, True), ("hang", {"timeout"}, True)])
def test_front_door_goes_down_and_comes_back(store, how, failures, accepted):
    store.client().put_object(Bucket=store.bucket, Key="down", Body=b"x")
    assert _status(store, "down") == "ok"
    store.set_down(True, how)
    try:
        before = store.front.accepted
        assert _status(store, "down", timeout=0.5) in failures
        assert (store.front.accepted > before) == accepted
        if how == "hang":
            assert store.front.held >= 1
    finally:
        store.set_down(False)
    assert _status(store, "down") == "ok"


def test_stall_freezes_a_transfer_midway(store):
    body = os.urandom(32 << 20)  # more than the socket buffers on the way hold
    store.client().put_object(Bucket=store.bucket, Key="big", Body=body)
    response = store.client(read_timeout=30).get_object(Bucket=store.bucket, Key="big")["Body"]
    first = response.read(1 << 20)
    store.set_stalled(True)
    got = bytearray(first)
    done = threading.Event()

    def read_rest():
        while chunk := response.read(1 << 20):
            got.extend(chunk)
        done.set()

    reader = threading.Thread(target=read_rest, daemon=True)
    try:
        reader.start()
        # Whatever was in flight (socket buffers) arrives; then nothing more.
        assert not done.wait(1.0), "the stalled transfer finished"
        assert len(got) < len(body)
    finally:
        store.set_stalled(False)
    assert done.wait(30)
    assert bytes(got) == body
