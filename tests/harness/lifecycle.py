"""Start/stop for the harness's services (upstream, peer, containerd)."""

from __future__ import annotations


class Service:
    """`start()` runs `_start()` and stops everything it started if that fails;
    use as a context manager or call start()/stop()."""

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
