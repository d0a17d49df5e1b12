"""The mirror's hooks in-process, with mitmproxy's own test helpers (taddons,
tflow) and real leaves (store, fills, access gate, blob server) in front of
a canned registry: each decision in milliseconds. The same paths run end to
end, in a real mitmdump against distribution, in the test_e2e_* modules."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import threading
import time

import pytest
import requests
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from addon import flows
from addon.flows import Mark
from addon.mirror import RegistryCache
from addon.store import DiskBlobStore
from addon.workers import PER_REGISTRY
from tests.harness.canned_registry import CannedRegistry, image_manifest

WAIT = 30
ACCEPT = ("application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json")
LAYER = os.urandom(300_000)
PRIVATE = os.urandom(200_000)


@pytest.fixture
def registry():
    canned = CannedRegistry().start()
    yield canned
    canned.stop()


class Hall:
    """A configured RegistryCache and a way to send it requests."""

    def __init__(self, tctx, addon: RegistryCache, registry: CannedRegistry, mode: str):
        self.tctx, self.addon, self.registry, self.mode = tctx, addon, registry, mode

    def flow(self, path: str, method: str = "GET", user: str | None = None, host: str | None = None,
             port: int | None = None):
        target_host, target_port = self.registry.server.server_address[:2]
        request = tutils.treq(method=method.encode(), scheme=b"http", host=(host or target_host).encode(),
                              port=port or target_port, path=path.encode(), headers=(), content=b"")
        if user:
            request.headers["Authorization"] = f"Bearer {user}"
        if "/manifests/" in path:  # as containerd, Docker and skopeo ask: multi-arch indexes too
            request.headers["Accept"] = ACCEPT
        client = tflow.tclient_conn()
        client.proxy_mode = ProxyMode.parse(self.mode)
        client.sockname = ("127.0.0.1", 5999)
        client.timestamp_end = None  # still connected
        client.timestamp_tls_setup = None  # plain HTTP: blobs by 307
        return tflow.tflow(client_conn=client, req=request)

    async def send(self, flow):
        self.addon.requestheaders(flow)
        await self.addon.request(flow)
        return flow

    async def get(self, path: str, **kw):
        return await self.send(self.flow(path, **kw))

    @staticmethod
    def outcome(flow) -> flows.Outcome:
        return flows.state_of(flow).outcome

    async def follow(self, flow) -> bytes:
        """Follow the 307 to the blob server, as a client would."""
        assert flow.response.status_code == 307, flow.response
        got = await asyncio.to_thread(requests.get, flow.response.headers["Location"], timeout=WAIT)
        assert got.status_code == 200, got.text
        return got.content

    async def settle(self, flow) -> None:
        """Wait (bounded) for the fill a miss started to end."""
        fill = self.outcome(flow).fill
        await asyncio.wait_for(fill.wait_finished(), WAIT)


@contextlib.asynccontextmanager
async def hall_for(tmp_path, registry, mode: str | None = None, **options):
    addon = RegistryCache()
    with taddons.context(addon) as tctx:
        mode = mode or f"reverse:{registry.url}"
        tctx.configure(addon, mode=[f"{mode}@127.0.0.1:5999"], cache_dir=str(tmp_path / "cache"),
                       blob_host="127.0.0.1", **options)
        try:
            yield Hall(tctx, addon, registry, mode)
        finally:
            addon.done()


async def probed(access, registry: str, repo: str) -> None:
    """Until the background check of whether repo is public, which a fill
    starts, has ended (a registry's answer to it ends its quiet time)."""
    while access.probing(registry, repo):
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 3 * WAIT))


def test_a_miss_fills_once_and_a_second_request_is_a_hit(tmp_path, registry):
    digest = registry.add_blob("library/alpine", LAYER)

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            miss = await hall.get(f"/v2/library/alpine/blobs/{digest}")
            assert hall.outcome(miss).mark is Mark.MISS and miss.metadata["registry_cache"] == "miss"
            assert await hall.follow(miss) == LAYER
            await hall.settle(miss)
            hit = await hall.get(f"/v2/library/alpine/blobs/{digest}")
            assert hall.outcome(hit).mark is Mark.HIT and hit.marked == ":green_circle:"
            assert await hall.follow(hit) == LAYER
            head = await hall.get(f"/v2/library/alpine/blobs/{digest}", method="HEAD")
            assert head.response.status_code == 200 and head.response.headers["X-Registry-Cache"] == "hit"
            assert registry.count("GET", digest) == 1

    run(scenario())


def test_a_private_blob_is_denied_to_a_client_the_registry_refuses(tmp_path, registry):
    digest = registry.add_blob("acme/private", PRIVATE, readers={"alice"})

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            alice = await hall.get(f"/v2/acme/private/blobs/{digest}", user="alice")
            assert await hall.follow(alice) == PRIVATE
            await hall.settle(alice)
            anonymous = await hall.get(f"/v2/acme/private/blobs/{digest}")
            assert hall.outcome(anonymous).mark is Mark.DENIED
            assert anonymous.response.status_code == 401
            assert "Bearer" in anonymous.response.headers["WWW-Authenticate"]
            assert PRIVATE not in anonymous.response.content

    run(scenario())


def test_a_blob_stored_from_elsewhere_is_fetched_again_from_a_registry_nobody_chose(tmp_path, registry):
    digest = registry.add_blob("library/alpine", LAYER)
    other = CannedRegistry().start()
    try:
        other.add_blob("library/alpine", LAYER)

        async def scenario():
            async with hall_for(tmp_path, registry, mode="regular",
                                registries=[f"trusted.test={registry.url}"]) as hall:
                stored = await hall.get(f"/v2/library/alpine/blobs/{digest}")
                await hall.follow(stored)
                await hall.settle(stored)
                host, port = other.server.server_address[:2]
                refetch = await hall.get(f"/v2/library/alpine/blobs/{digest}", host=host, port=port)
                assert hall.outcome(refetch).mark is Mark.MISS
                assert await hall.follow(refetch) == LAYER
                assert other.count("GET", digest) == 1  # its bytes are its proof

        run(scenario())
    finally:
        other.stop()


def test_a_tag_is_answered_stale_while_the_registry_is_down(tmp_path, registry):
    config = os.urandom(100)
    registry.add_blob("library/alpine", config)
    registry.add_manifest("library/alpine", "3.20", image_manifest(config, []))

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            fresh = await hall.get("/v2/library/alpine/manifests/3.20")
            assert hall.outcome(fresh).mark is Mark.PASS and fresh.response.status_code == 200
            registry.down = True
            stale = await hall.get("/v2/library/alpine/manifests/3.20")
            assert hall.outcome(stale).mark is Mark.STALE
            assert stale.response.status_code == 200 and stale.response.content == fresh.response.content
            assert stale.response.headers["X-Registry-Cache"] == "stale"

    run(scenario())


def test_a_client_that_left_costs_no_registry_call(tmp_path, registry):
    registry.add_manifest("library/alpine", "3.20", image_manifest(b"{}", []))

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            flow = hall.flow("/v2/library/alpine/manifests/3.20")
            flow.client_conn.timestamp_end = time.time()  # gone before a thread took the call up
            await hall.send(flow)
            assert hall.outcome(flow).mark is Mark.ERROR and flow.response.status_code == 503
            assert registry.requests == []

    run(scenario())


def test_a_blob_evicted_after_the_mirror_chose_to_serve_it_is_still_served(tmp_path, registry):
    digest = registry.add_blob("library/alpine", LAYER)

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            first = await hall.get(f"/v2/library/alpine/blobs/{digest}")
            await hall.follow(first)
            await hall.settle(first)
            hit = await hall.get(f"/v2/library/alpine/blobs/{digest}")
            assert hall.outcome(hit).mark is Mark.HIT
            assert hall.addon.services.storage.store.delete(digest)  # evicted before the client follows the 307
            assert await hall.follow(hit) == LAYER  # was: 404 BLOB_UNKNOWN
            assert registry.count("GET", digest) == 1

    run(scenario())


def test_a_manifest_answer_over_the_cap_is_an_error_of_its_own(tmp_path, registry, monkeypatch):
    monkeypatch.setattr("addon.upstream.MAX_RELAYED_BODY", 1000)
    registry.add_manifest("library/big", "v1", b'{"padding": "' + b"x" * 2000 + b'"}')

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            flow = await hall.get("/v2/library/big/manifests/v1")
            assert flow.response.status_code == 502 and b"too large" in flow.response.content
            assert hall.outcome(flow).mark is Mark.ERROR
            errors = hall.addon.metrics.snapshot({})["upstream_errors_total"]
            assert errors == {("too-large",): 1}  # not a connection error
            assert flow.response.headers.get("X-Registry-Cache") is None  # not answered stale

    run(scenario())


def test_a_request_naming_the_mirror_itself_is_refused_at_once(tmp_path, registry):
    async def scenario():
        async with hall_for(tmp_path, registry, mode="regular") as hall:
            blob_server = hall.addon.services.blob_server
            flow = await hall.get("/v2/", host="127.0.0.1", port=blob_server.port)
            assert flow.response.status_code == 508 and hall.outcome(flow).mark is Mark.ERROR
            assert b"names the mirror itself" in flow.response.content

    run(scenario())


def test_changing_cache_dir_lets_a_running_fill_finish_into_its_own_store(tmp_path, registry):
    digest = registry.add_blob("library/alpine", LAYER)

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            old_storage = hall.addon.services.storage
            registry.stall()
            miss = await hall.get(f"/v2/library/alpine/blobs/{digest}")
            assert await asyncio.to_thread(registry.wait_stalled)
            hall.tctx.configure(hall.addon, cache_dir=str(tmp_path / "elsewhere"))
            assert hall.addon.services.storage is not old_storage
            assert not old_storage.closed  # its fill still runs
            registry.release()
            await hall.settle(miss)
            await asyncio.wait_for(asyncio.gather(*list(hall.addon._tasks)), WAIT)  # the retirement
            assert old_storage.closed
        old = DiskBlobStore(tmp_path / "cache", 1 << 30)
        try:
            assert digest in old  # committed into the store it started with, not a closed one
        finally:
            old.close()

    run(scenario())


def test_a_new_cache_size_rebuilds_nothing(tmp_path, registry):
    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            storage, blob_server = hall.addon.services.storage, hall.addon.services.blob_server
            hall.tctx.configure(hall.addon, cache_size="1g")
            assert hall.addon.services.storage is storage and hall.addon.services.blob_server is blob_server
            assert storage.store.size_limit == 1 << 30 and storage.fills.max_stored_size == 1 << 30

    run(scenario())


def test_rehashing_a_modified_blob_holds_up_no_other_hit(tmp_path, registry, monkeypatch):
    """Re-hashing a multi-GB blob whose file changed ran in the local pool:
    enough of them held up every hit behind them."""
    digests = [registry.add_blob("library/alpine", os.urandom(1000 + n)) for n in range(10)]
    healthy = registry.add_blob("library/alpine", LAYER)
    release = threading.Event()
    real = DiskBlobStore._still_intact

    def slow_rehash(*args):
        release.wait(WAIT)
        return real(*args)

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            for digest in digests + [healthy]:
                flow = await hall.get(f"/v2/library/alpine/blobs/{digest}")
                await hall.follow(flow)
                await hall.settle(flow)
            store = hall.addon.services.storage.store
            for digest in digests:  # touched on disk: each must be re-hashed before it is served
                blob = store.open(digest)
                os.utime(blob.file.fileno(), ns=(1, 1))
                blob.close()
            monkeypatch.setattr(DiskBlobStore, "_still_intact", staticmethod(slow_rehash))
            rehashing = [asyncio.ensure_future(hall.get(f"/v2/library/alpine/blobs/{d}")) for d in digests]
            hit = await asyncio.wait_for(hall.get(f"/v2/library/alpine/blobs/{healthy}"), WAIT)
            assert hall.outcome(hit).mark is Mark.HIT
            assert not any(task.done() for task in rehashing)
            release.set()
            for task in rehashing:
                assert hall.outcome(await task).mark is Mark.HIT

    try:
        run(scenario())
    finally:
        release.set()


def test_the_start_line_says_where_containerds_docker_io_goes(tmp_path, registry, caplog):
    async def scenario():
        with caplog.at_level(logging.INFO, logger="registry_cache"):
            async with hall_for(tmp_path, registry):
                pass

    run(scenario())
    line = next(r.getMessage() for r in caplog.records if "blob server on" in r.getMessage())
    assert "?ns=docker.io goes to Docker Hub, not to the reverse-mode upstream" in line



def test_a_challenge_names_the_token_relay_which_reaches_the_registrys_own_realm(tmp_path, registry):
    """Issue #13: a machine that reaches only the mirror gets its token
    through it, from the token server the registry itself named."""
    registry.auth = True
    name = registry.server.host_port

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            ping = await hall.get("/v2/")
            assert ping.response.status_code == 401
            challenge = ping.response.headers["WWW-Authenticate"]
            assert challenge == f'Bearer realm="http://127.0.0.1:5999/_registry_cache/token/{name}",service="canned"'
            basic = "Basic " + base64.b64encode(b"alice:secret").decode()
            token = hall.flow(f"/_registry_cache/token/{name}?service=canned&scope=repository:acme/private:pull")
            token.request.headers["Authorization"] = basic
            await hall.send(token)
            assert token.response.status_code == 200 and token.response.json()["token"] == "alice"
            forwarded = registry.token_requests[-1]
            assert forwarded["query"] == "service=canned&scope=repository:acme/private:pull"
            assert forwarded["authorization"] == basic
            form = hall.flow(f"/_registry_cache/token/{name}", method="POST")
            form.request.headers["Content-Type"] = "application/x-www-form-urlencoded"
            form.request.content = b"grant_type=password&username=alice&password=secret&service=canned"
            await hall.send(form)
            assert form.response.status_code == 200
            assert registry.token_requests[-1]["body"] == form.request.content
            assert registry.token_requests[-1]["content_type"] == "application/x-www-form-urlencoded"

    run(scenario())


def test_behind_a_load_balancer_the_realm_names_the_mirror_url(tmp_path, registry):
    """Behind a load balancer or NAT, the address the client connected to is
    the node's own (a pod's IP), which the client may not reach."""
    registry.auth = True

    async def scenario():
        async with hall_for(tmp_path, registry, mirror_url="https://mirror.example.com:443/") as hall:
            ping = await hall.get("/v2/")
            assert ping.response.headers["WWW-Authenticate"] == \
                f'Bearer realm="https://mirror.example.com:443/_registry_cache/token/{registry.server.host_port}",' \
                'service="canned"'

    run(scenario())


def test_a_token_request_never_goes_where_the_client_says(tmp_path, registry):
    registry.auth = True
    canary = CannedRegistry().start()
    try:
        async def scenario():
            async with hall_for(tmp_path, registry) as hall:
                await hall.get("/v2/")  # the registry's challenge: its realm is learned
                for path in (f"/_registry_cache/token/{canary.server.host_port}?service=canned",
                             f"/_registry_cache/token/{registry.server.host_port}?realm={canary.url}/token"
                             f"&url={canary.url}&service=canned",
                             f"/_registry_cache/token/{registry.server.host_port}/..%2f{canary.server.host_port}"):
                    flow = await hall.get(path)
                    assert flow.response.status_code in (200, 404), (path, flow.response)
                assert canary.requests == [] and canary.token_requests == []
                assert len(registry.token_requests) == 1  # the added realm= went to the registry's own realm

        run(scenario())
    finally:
        canary.stop()


def test_the_registrys_rate_limit_is_in_the_metrics_with_a_warning_when_little_is_left(tmp_path, registry, caplog):
    config = os.urandom(100)
    registry.add_blob("library/alpine", config)
    registry.add_manifest("library/alpine", "3.20", image_manifest(config, []))
    registry.ratelimit = (100, 7)

    async def scenario():
        with caplog.at_level(logging.WARNING):
            async with hall_for(tmp_path, registry) as hall:
                await hall.get("/v2/library/alpine/manifests/3.20")
                stats = hall.addon.metrics.stats({"fills_in_flight": 0, "store_bytes": 0, "store_blobs": 0,
                                                  "store_limit_bytes": 0, "evictions_total": 0})
                assert stats["upstream_rate_limits"] == {registry.url: {"limit": 100, "remaining": 7}}

    run(scenario())
    assert any("allows 7 more pulls of 100" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("interval", [0, 60])
def test_a_tag_is_asked_again_on_every_pull_unless_the_operator_lets_it_be_reused(tmp_path, registry, interval):
    config = os.urandom(100)
    registry.add_blob("library/alpine", config)
    registry.add_manifest("library/alpine", "3.20", image_manifest(config, []))

    async def scenario():
        async with hall_for(tmp_path, registry, tag_check_interval=interval) as hall:
            # Known public beforehand: no background check of it mixes in with the requests counted.
            access = hall.addon.services.storage.access
            assert await asyncio.to_thread(access.public_now, registry.url, "library/alpine", "manifests/3.20")
            cold = await hall.get("/v2/library/alpine/manifests/3.20")
            assert hall.outcome(cold).mark is Mark.PASS
            asked = len(registry.requests)
            for method in ("GET", "HEAD"):
                warm = await hall.get("/v2/library/alpine/manifests/3.20", method=method)
                assert warm.response.status_code == 200
                assert warm.response.headers["Docker-Content-Digest"] == cold.response.headers["Docker-Content-Digest"]
            # 0: each pull asks the registry with a HEAD; 60: nobody asks it for a minute
            assert [(m, "manifests" in p) for m, p, _ in registry.requests[asked:]] == \
                ([] if interval else [("HEAD", True), ("HEAD", True)])
            assert registry.count("GET", "/manifests/") == 1  # the cold pull's only

    run(scenario())


@pytest.mark.parametrize("public", [True, False])
def test_clients_asking_for_the_same_tag_at_once_share_one_head_of_a_public_repository(tmp_path, registry, public):
    """A rollout: every node asks for the tag at the same moment. For a
    repository known to be public they share the one HEAD on its way; for
    any other, each client's own credentials must be checked by a HEAD of its own."""
    config = os.urandom(100)
    readers = None if public else {"alice"}
    registry.add_blob("library/alpine", config, readers=readers)
    registry.add_manifest("library/alpine", "3.20", image_manifest(config, []), readers=readers)
    user = None if public else "alice"

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            access = hall.addon.services.storage.access
            assert await asyncio.to_thread(access.public_now, registry.url, "library/alpine", "manifests/3.20") is public
            cold = await hall.get("/v2/library/alpine/manifests/3.20", user=user)  # kept in the store
            assert cold.response.status_code == 200
            asked = registry.count("HEAD", "/manifests/")
            registry.hold_manifests()
            pulls = [asyncio.ensure_future(hall.get("/v2/library/alpine/manifests/3.20", user=user)) for _ in range(5)]
            assert await asyncio.to_thread(registry.wait_manifest_held)  # one HEAD is on its way, held
            if not public:
                for _ in range(4):
                    assert await asyncio.to_thread(registry.wait_manifest_held)
            registry.release_manifests()
            for flow in await asyncio.gather(*pulls):
                assert flow.response.status_code == 200 and hall.outcome(flow).mark is Mark.HIT
            assert registry.count("HEAD", "/manifests/") - asked == (1 if public else 5)

    run(scenario())


def test_when_the_registry_goes_down_its_ping_is_asked_again_and_answered_stale(tmp_path, registry):
    """Anonymous pings reuse the registry's challenge for a few seconds; once
    it (or its token server) fails, the next ping must go to it again, so that
    clients get the stale answer, which needs no token, while it is down."""
    config = os.urandom(100)
    registry.add_blob("library/alpine", config)
    registry.add_manifest("library/alpine", "3.20", image_manifest(config, []))
    registry.auth = True
    name = registry.server.host_port

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            await hall.get("/v2/library/alpine/manifests/3.20", user="alice")  # the registry is known
            assert (await hall.get("/v2/")).response.status_code == 401  # its challenge, kept for a few seconds
            registry.down = True
            token = await hall.get(f"/_registry_cache/token/{name}?service=canned&scope=repository:library/alpine:pull")
            assert token.response.status_code in (502, 503)  # its token server failed
            ping = await hall.get("/v2/")
            assert ping.response.status_code == 200 and ping.response.headers["X-Registry-Cache"] == "stale"

    run(scenario())


def test_while_a_registry_hangs_an_access_check_is_decided_at_once_not_after_its_threads(tmp_path, registry):
    """All of a hung registry's threads wait on it; an access check the
    store can decide alone (from what the registry said before) must not
    queue behind them: it waited the whole upstream_timeout."""
    digest = registry.add_blob("acme/private", PRIVATE, readers={"alice"})

    async def scenario():
        async with hall_for(tmp_path, registry) as hall:
            alice = await hall.get(f"/v2/acme/private/blobs/{digest}", user="alice")
            await hall.follow(alice)
            await hall.settle(alice)
            services = hall.addon.services
            await asyncio.wait_for(probed(services.storage.access, registry.url, "acme/private"), WAIT)
            services.upstream._timed_out[registry.url] = time.monotonic()  # it let a request time out just now
            release = threading.Event()
            hung = [asyncio.ensure_future(hall.addon.workers.upstream(registry.url, release.wait, WAIT))
                    for _ in range(PER_REGISTRY)]
            try:
                flow = await asyncio.wait_for(
                    hall.get(f"/v2/acme/private/blobs/{digest}", user="bob"), WAIT / 3)  # a credential never seen
                assert flow.response.status_code == 503 and hall.outcome(flow).mark is Mark.DENIED
                assert not any(task.done() for task in hung)  # decided while every thread still waited
            finally:
                release.set()
                await asyncio.gather(*hung)

    run(scenario())
