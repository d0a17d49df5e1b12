"""Build test images and push them with the OCI distribution push API.

Layers are gzip'd tars holding one file of seeded random bytes: random so the
blob is as big as asked (nothing compresses), seeded so a test can rebuild the
same bytes and digest. gzip level 0 (stored blocks) keeps building a 500 MB
layer I/O-bound. Everything is deterministic (tar and gzip mtimes are 0), so
the same layers and platform always give the same config and manifest digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import zlib
from dataclasses import dataclass, field

from .v2client import (
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_LIST, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX,
    OCI_LAYER_GZIP, OCI_MANIFEST, RegistryClient, RegistryError, VerificationError, _raise_for,
    sha256_digest,
)

CHUNK = 1 << 20


# ---------------------------------------------------------------------------- layers
class _RandomReader:
    """``size`` seeded random bytes as a file; the stream depends only on the seed."""

    def __init__(self, size: int, seed: int):
        self._rng = random.Random(seed)
        self._left = size
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left + len(self._buf)
        while len(self._buf) < n and self._left > 0:
            # Always draw whole 1 MiB blocks (or the tail) so how callers
            # chunk their reads cannot change the bytes produced.
            take = min(CHUNK, self._left)
            self._buf += self._rng.randbytes(take)
            self._left -= take
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class _HashingWriter:
    """Write-through file wrapper that hashes and counts what passes."""

    def __init__(self, target):
        self.target = target
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.hasher.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)

    def flush(self) -> None:
        self.target.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


def _write_layer(out, size_bytes: int, seed: int) -> tuple[str, int, str]:
    """Write a layer to ``out``; return (digest, size, diff_id)."""
    compressed = _HashingWriter(out)
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=0, mtime=0)
    uncompressed = _HashingWriter(gz)
    info = tarfile.TarInfo(f"layer-{seed}.bin")
    info.size = size_bytes
    info.mtime = 0
    info.mode = 0o644
    with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tf:
        tf.addfile(info, _RandomReader(size_bytes, seed))
    gz.close()
    return compressed.digest, compressed.size, uncompressed.digest


def make_layer(size_bytes: int, seed: int) -> bytes:
    """A gzip'd tar with one file of ``size_bytes`` seeded random bytes."""
    buf = io.BytesIO()
    _write_layer(buf, size_bytes, seed)
    return buf.getvalue()


@dataclass(frozen=True)
class LayerFile:
    """A layer built on disk, with the digests computed while writing it."""

    path: str
    digest: str
    size: int
    diff_id: str


def make_layer_file(path: str, size_bytes: int, seed: int) -> LayerFile:
    """Like :func:`make_layer` (same bytes for the same arguments) but streamed to ``path``."""
    with open(path, "wb") as f:
        digest, size, diff_id = _write_layer(f, size_bytes, seed)
    return LayerFile(path, digest, size, diff_id)


def diff_id_of(layer: bytes) -> str:
    """sha256 of the uncompressed tar (what an image config lists in rootfs.diff_ids)."""
    return sha256_digest(zlib.decompress(layer, 16 + zlib.MAX_WBITS))


def _diff_id_of_file(path: str) -> str:
    hasher = hashlib.sha256()
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(d.decompress(chunk))
    hasher.update(d.flush())
    return "sha256:" + hasher.hexdigest()


def _file_digest(path: str) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size


# ---------------------------------------------------------------------------- push API
def _client(base_url: str, auth, client: RegistryClient | None, verify) -> RegistryClient:
    if client is not None:
        return client
    user, password = auth if auth else (None, None)
    return RegistryClient(base_url, username=user, password=password, verify=verify)


class _FileSlice:
    """``length`` bytes of a file from ``offset``, as a request body with a known length."""

    def __init__(self, path: str, offset: int, length: int):
        self._f = open(path, "rb")
        self._f.seek(offset)
        self._left = length
        self.length = length

    def __len__(self) -> int:
        return self.length

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        n = min(n, CHUNK * 4) if n else 0
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


def _start_upload(c: RegistryClient, repo: str) -> str:
    resp = c.request("POST", f"/v2/{repo}/blobs/uploads/")
    _raise_for(resp, f"start upload to {repo}")
    if resp.status_code != 202:
        raise RegistryError(f"start upload to {repo}: HTTP {resp.status_code}", resp.status_code)
    return resp.headers["Location"]


def push_blob(base_url: str, repo: str, blob: bytes | str | os.PathLike | LayerFile, *,
              auth: tuple[str, str] | None = None, client: RegistryClient | None = None,
              digest: str | None = None, chunk_size: int | None = 64 * CHUNK,
              verify=True) -> tuple[str, int]:
    """Upload a blob unless the registry has it; return (digest, size).

    bytes go monolithically (POST, then PUT with the body). A file is streamed
    from disk with PATCH requests of ``chunk_size`` bytes (Content-Range), or
    one streamed PATCH when chunk_size is None, then a body-less PUT.
    """
    c = _client(base_url, auth, client, verify)
    path = None
    if isinstance(blob, LayerFile):
        path, digest, size = blob.path, blob.digest, blob.size
    elif isinstance(blob, (bytes, bytearray)):
        blob = bytes(blob)
        digest, size = sha256_digest(blob), len(blob)
    else:
        path = os.fspath(blob)
        if digest is None:
            digest, size = _file_digest(path)
        else:
            size = os.path.getsize(path)

    head = c.request("HEAD", f"/v2/{repo}/blobs/{digest}")
    if head.status_code == 200:
        return digest, size

    if path is not None and size == 0:
        path, blob = None, b""
    location = _start_upload(c, repo)  # also fetches the push token before any stream
    if path is None:
        resp = c.request("PUT", location, params={"digest": digest}, data=blob, repo=repo,
                         headers={"Content-Type": "application/octet-stream"})
        _raise_for(resp, f"put blob {digest}")
    else:
        offset = 0
        step = chunk_size or size
        while offset < size:
            length = min(step, size - offset)
            body = _FileSlice(path, offset, length)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
            if chunk_size is not None:
                headers["Content-Range"] = f"{offset}-{offset + length - 1}"
            try:
                resp = c.request("PATCH", location, data=body, headers=headers, repo=repo)
            finally:
                body.close()
            _raise_for(resp, f"patch blob {digest} at {offset}")
            location = resp.headers["Location"]
            offset += length
        resp = c.request("PUT", location, params={"digest": digest}, data=b"", repo=repo)
        _raise_for(resp, f"finish blob {digest}")
    got = resp.headers.get("Docker-Content-Digest")
    if got and got != digest:
        raise VerificationError(f"registry stored {got} for blob {digest}")
    return digest, size


def push_manifest(base_url: str, repo: str, ref: str, body: bytes, media_type: str, *,
                  auth=None, client: RegistryClient | None = None, verify=True) -> str:
    """PUT a manifest by tag or digest; return its digest (checked against the registry's)."""
    c = _client(base_url, auth, client, verify)
    digest = sha256_digest(body)
    resp = c.request("PUT", f"/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": media_type})
    _raise_for(resp, f"put manifest {repo}:{ref}")
    got = resp.headers.get("Docker-Content-Digest")
    if got and got != digest:
        raise VerificationError(f"registry says manifest {repo}:{ref} is {got}, we computed {digest}")
    return digest


@dataclass
class PushedImage:
    """An image manifest that was pushed, and what it references."""

    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    config_digest: str
    config: bytes
    layers: list[tuple[str, int]]
    platform: tuple[str, ...]

    @property
    def blobs(self) -> list[tuple[str, int]]:
        """(digest, size) of the config and every layer: what a full pull transfers."""
        return [(self.config_digest, len(self.config))] + list(self.layers)

    @property
    def blob_bytes(self) -> int:
        return sum(size for _, size in self.blobs)

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.tag}" if self.tag else f"{self.repo}@{self.digest}"


@dataclass
class PushedIndex:
    """A multi-arch index (OCI image index or Docker manifest list) that was pushed."""

    repo: str
    tag: str | None
    digest: str
    manifest: bytes
    media_type: str
    images: dict[tuple[str, ...], PushedImage] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.tag}" if self.tag else f"{self.repo}@{self.digest}"


def _dumps(obj) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def push_image(base_url: str, repo: str, tag: str | None, layers: list, *,
               auth: tuple[str, str] | None = None, platform: tuple[str, ...] = ("linux", "amd64"),
               fmt: str = "oci", config_extra: dict | None = None,
               client: RegistryClient | None = None, verify=True) -> PushedImage:
    """Push config + layers + a manifest (``fmt`` "oci" or "docker" schema2).

    ``layers`` holds bytes, :class:`LayerFile` objects or paths of layer files.
    ``tag`` None pushes by digest only. ``config_extra`` is merged into the
    image config, e.g. to get a different image digest from the same layers.
    """
    if fmt not in ("oci", "docker"):
        raise ValueError("fmt must be 'oci' or 'docker'")
    c = _client(base_url, auth, client, verify)
    descriptors, diff_ids = [], []
    for layer in layers:
        if isinstance(layer, LayerFile):
            diff_ids.append(layer.diff_id)
        elif isinstance(layer, (bytes, bytearray)):
            diff_ids.append(diff_id_of(bytes(layer)))
        else:
            diff_ids.append(_diff_id_of_file(os.fspath(layer)))
        digest, size = push_blob(base_url, repo, layer, client=c)
        descriptors.append((digest, size))

    os_name, arch, *rest = platform
    config_obj = {
        "architecture": arch,
        "os": os_name,
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"harness layer {i}"}
                    for i in range(len(layers))],
    }
    if rest:
        config_obj["variant"] = rest[0]
    config_obj.update(config_extra or {})
    config = _dumps(config_obj)
    config_digest, _ = push_blob(base_url, repo, config, client=c)

    manifest_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    layer_type = OCI_LAYER_GZIP if fmt == "oci" else DOCKER_LAYER_GZIP
    manifest = _dumps({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": OCI_CONFIG if fmt == "oci" else DOCKER_CONFIG,
                   "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": d, "size": s} for d, s in descriptors],
    })
    digest = push_manifest(base_url, repo, tag or sha256_digest(manifest), manifest, manifest_type, client=c)
    return PushedImage(repo, tag, digest, manifest, manifest_type, config_digest, config,
                       descriptors, tuple(platform))


def push_index(base_url: str, repo: str, tag: str | None,
               images_by_platform: dict[tuple[str, ...], list], *,
               auth: tuple[str, str] | None = None, fmt: str = "oci",
               client: RegistryClient | None = None, verify=True) -> PushedIndex:
    """Push one image per platform (by digest), then an index over them under ``tag``.

    ``images_by_platform`` maps (os, arch[, variant]) to a list of layers.
    """
    c = _client(base_url, auth, client, verify)
    images: dict[tuple[str, ...], PushedImage] = {}
    entries = []
    for platform, layers in images_by_platform.items():
        image = push_image(base_url, repo, None, layers, platform=platform, fmt=fmt, client=c)
        images[tuple(platform)] = image
        plat = {"architecture": platform[1], "os": platform[0]}
        if len(platform) > 2:
            plat["variant"] = platform[2]
        entries.append({"mediaType": image.media_type, "digest": image.digest,
                        "size": len(image.manifest), "platform": plat})
    index_type = OCI_INDEX if fmt == "oci" else DOCKER_LIST
    body = _dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": entries})
    digest = push_manifest(base_url, repo, tag or sha256_digest(body), body, index_type, client=c)
    return PushedIndex(repo, tag, digest, body, index_type, images)


def delete_manifest(base_url: str, repo: str, digest: str, *, auth=None,
                    client: RegistryClient | None = None, verify=True) -> None:
    """DELETE a manifest by digest (the tags pointing at it go with it)."""
    c = _client(base_url, auth, client, verify)
    resp = c.request("DELETE", f"/v2/{repo}/manifests/{digest}")
    _raise_for(resp, f"delete manifest {repo}@{digest}")


def delete_blob(base_url: str, repo: str, digest: str, *, auth=None,
                client: RegistryClient | None = None, verify=True) -> None:
    """DELETE a blob link from a repository (the data stays until garbage collection)."""
    c = _client(base_url, auth, client, verify)
    resp = c.request("DELETE", f"/v2/{repo}/blobs/{digest}")
    _raise_for(resp, f"delete blob {repo}@{digest}")
