"""Taking a node out of service without failing its clients: the health
endpoint a load balancer probes, and what SIGTERM does.

`/_registry_cache/health` answers 200 while the node serves, and 503
("draining") from SIGTERM on, so the load balancer (or Kubernetes' readiness
probe, which also takes the pod out of a headless service's DNS answer)
stops sending it new clients. It reports an object store that is down and
the members it counts as down, without turning unhealthy over them: the
node serves from its own store and the upstream meanwhile, and taking every
node out because the bucket is unreachable would turn a degraded cluster
into an outage.

SIGTERM (as Kubernetes and systemd send) starts draining instead of stopping
at once: requests keep being answered, fills and blob transfers in progress
go on, and other nodes' requests that would start a new fill here are
answered 503, so they go to the next node in rank. The process stops once
nothing is in progress, or after `drain_timeout` seconds: the fills still
running then are cut, and the other nodes following them go on from the
next in rank (peers.py). A second SIGTERM, or SIGINT, stops it at once.
Nothing is deleted from the object store on the way out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable

from mitmproxy import http

log = logging.getLogger("registry_cache")

HEALTH_PATH = "/_registry_cache/health"
CHECK_EVERY = 0.1  # seconds between looks at what is still in progress


class Drain:
    def __init__(self, in_progress: Callable[[], dict[str, int]], report: Callable[[], dict]):
        """in_progress(): counts of what must end before the process stops
        (fills, blob transfers, requests); report(): the health details."""
        self.in_progress = in_progress
        self.report = report
        self.since: float | None = None  # monotonic time of the SIGTERM
        self._task: asyncio.Task | None = None
        self.on_drain: Callable[[], None] = lambda: None  # e.g. refuse new fills for other nodes

    @property
    def draining(self) -> bool:
        return self.since is not None

    def install(self, shutdown: Callable[[], None], timeout: Callable[[], float]) -> None:
        """Take over SIGTERM from mitmproxy (which stops at once); call from the event loop."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, self._sigterm, shutdown, timeout)
        except (NotImplementedError, RuntimeError) as exc:  # no signals here (a test's loop, another thread)
            log.info("registry-cache: SIGTERM stops at once here (%s)", exc)

    def _sigterm(self, shutdown: Callable[[], None], timeout: Callable[[], float]) -> None:
        if self.draining:
            log.info("registry-cache: SIGTERM again: stopping now")
            shutdown()
            return
        self.since = time.monotonic()
        self.on_drain()
        busy = {name: n for name, n in self.in_progress().items() if n}
        log.info("registry-cache: SIGTERM: draining (health answers 503); stopping once nothing is in progress%s, "
                 "at most %.0f s from now", f" ({_listed(busy)})" if busy else "", timeout())
        self._task = asyncio.get_running_loop().create_task(self._stop_when_idle(shutdown, timeout()))

    async def _stop_when_idle(self, shutdown: Callable[[], None], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = {name: n for name, n in self.in_progress().items() if n}
            if not busy:
                log.info("registry-cache: drained in %.1f s; stopping", time.monotonic() - self.since)
                break
            await asyncio.sleep(CHECK_EVERY)
        else:
            log.warning("registry-cache: drain_timeout (%.0f s) is over with %s still in progress; stopping",
                        timeout, _listed(busy))
        shutdown()

    def health_response(self) -> http.Response:
        body = {"status": "draining" if self.draining else "ok", **self.report()}
        return http.Response.make(503 if self.draining else 200, json.dumps(body, indent=1).encode(),
                                  {"Content-Type": "application/json", "Cache-Control": "no-store"})


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items())
