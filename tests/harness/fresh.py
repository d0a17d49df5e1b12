"""Images and layers no earlier test pushed: every test that counts upstream
bytes or checks what the mirror stored needs content the mirror has not seen."""

from __future__ import annotations

import itertools

from .images import PushedImage, make_layer, push_image
from .upstream import ALICE

# Above every hand-picked seed (conftest's session images, test_e2e_load).
_seeds = itertools.count(1_000_000)


def unique_seed() -> int:
    """A number no other caller in this test session got: a seed for
    make_layer() (distinct random content) or a unique repository name."""
    return next(_seeds)


def fresh_layer(size: int) -> bytes:
    return make_layer(size, unique_seed())


def fresh_image(upstream, *sizes: int, repo: str | None = None, verify=True) -> PushedImage:
    """Pushed by alice with one new layer per size, tag v1; the upstream's
    counters start at zero."""
    image = push_image(upstream.url, repo or f"fresh/img{unique_seed()}", "v1",
                       [fresh_layer(size) for size in sizes], auth=ALICE, verify=verify)
    upstream.reset_counters()
    return image
