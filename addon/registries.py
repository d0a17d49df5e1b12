"""Which registries one mirror serves, chosen by containerd's `?ns=` parameter.

containerd tells a mirror which registry an image name meant by appending
`?ns=<registry host>` (docker.io, ghcr.io, ...). The mirror sends such a
request to that registry, but only if it is on the `registries` list: any
other value is refused, so the mirror can never be used as an open relay to
arbitrary hosts or to internal addresses. Requests without `ns` go to the
reverse-mode upstream as before.

List entries are a registry name (`ghcr.io`: https://ghcr.io) or
`name=URL` to say where it lives (`docker.io` is https://registry-1.docker.io).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

DOCKER_HUB_NAME = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
DEFAULT_REGISTRIES = (
    "docker.io", "ghcr.io", "quay.io", "gcr.io", "registry.k8s.io", "public.ecr.aws",
    "mcr.microsoft.com", "registry.gitlab.com", "nvcr.io",
)
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?", re.IGNORECASE)


def parse_registries(entries: Iterable[str]) -> dict[str, str]:
    """{registry name: base URL} from option entries (comma-separated allowed).

    Raises ValueError with the offending entry.
    """
    registries: dict[str, str] = {}
    for entry in (part.strip() for item in entries for part in item.split(",")):
        if not entry:
            continue
        name, _, url = entry.partition("=")
        name = name.strip().lower()
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"not a registry name: {name!r} (in {entry!r})")
        if not url:
            url = DOCKER_HUB_URL if name == DOCKER_HUB_NAME else f"https://{name}"
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.username:
            raise ValueError(f"not a registry URL: {url!r} (in {entry!r}); want scheme://host[:port]")
        registries[name] = f"{parts.scheme}://{parts.netloc}"
    return registries


def origin_of(url: str) -> str:
    """scheme://host:port with the port spelled out: how the access gate names
    a registry (see mirror._registry_of), whatever form the URL came in."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def base_url_for(ns: str, registries: dict[str, str]) -> str | None:
    """Where the registry containerd named lives, or None if it is not served."""
    return registries.get(ns.strip().lower())
