"""Unit tests: parsing and validation of /v2/ request paths."""

import pytest

from addon import routes
from addon.routes import Kind, RouteError

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "path, kind, name, ref",
    [
        ("/v2/", Kind.PING, "", ""),
        ("/v2", Kind.PING, "", ""),
        (f"/v2/library/alpine/blobs/{DIGEST}", Kind.BLOB, "library/alpine", DIGEST),
        (f"/v2/a/b/c/blobs/{DIGEST}", Kind.BLOB, "a/b/c", DIGEST),
        # a repository may itself contain "blobs" or "manifests" components
        (f"/v2/blobs/manifests/blobs/{DIGEST}", Kind.BLOB, "blobs/manifests", DIGEST),
        ("/v2/library/alpine/manifests/3.20", Kind.MANIFEST, "library/alpine", "3.20"),
        (f"/v2/library/alpine/manifests/{DIGEST}", Kind.MANIFEST, "library/alpine", DIGEST),
        ("/v2/my-org/my_app.x/manifests/Latest_1", Kind.MANIFEST, "my-org/my_app.x", "Latest_1"),
        ("/v2/library/alpine/tags/list", Kind.OTHER, "", ""),
        ("/v2/_catalog", Kind.OTHER, "", ""),
        ("/v2/library/alpine/blobs/uploads/", Kind.OTHER, "", ""),
        ("/v2/library/alpine/blobs/uploads/1234-abcd", Kind.OTHER, "", ""),
    ],
)
def test_classifies_valid_paths(path, kind, name, ref):
    route = routes.parse(path)
    assert (route.kind, route.name, route.reference) == (kind, name, ref)


def test_namespace_query_is_read():
    route = routes.parse(f"/v2/library/alpine/blobs/{DIGEST}?ns=docker.io")
    assert route.kind is Kind.BLOB and route.namespace == "docker.io"
    assert routes.parse("/v2/?x=1").namespace is None


@pytest.mark.parametrize(
    "path, code",
    [
        (f"/v2/Library/alpine/blobs/{DIGEST}", "NAME_INVALID"),  # uppercase
        (f"/v2/../etc/blobs/{DIGEST}", "NAME_INVALID"),  # traversal
        (f"/v2/library/../../blobs/{DIGEST}", "NAME_INVALID"),
        (f"/v2/library%2f..%2fx/blobs/{DIGEST}", "NAME_INVALID"),  # encoded slash
        (f"/v2/library/%2e%2e/blobs/{DIGEST}", "NAME_INVALID"),
        (f"/v2//alpine/blobs/{DIGEST}", "NAME_INVALID"),
        (f"/v2/a-/blobs/{DIGEST}", "NAME_INVALID"),
        (f"/v2/{'a' * 256}/blobs/{DIGEST}", "NAME_INVALID"),
        ("/v2/library/alpine/blobs/sha256:abc", "DIGEST_INVALID"),  # short
        ("/v2/library/alpine/blobs/sha256:" + "AB" * 32, "DIGEST_INVALID"),  # uppercase hex
        ("/v2/library/alpine/blobs/sha512:" + "ab" * 64, "DIGEST_INVALID"),  # unsupported
        ("/v2/library/alpine/blobs/sha256:..%2f..%2fetc", "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/notadigest", "DIGEST_INVALID"),
        ("/v2/library/alpine/manifests/-bad", "MANIFEST_INVALID"),
        ("/v2/library/alpine/manifests/sha256:xyz", "DIGEST_INVALID"),
        ("/v2/" + "a/" * 2000 + f"blobs/{DIGEST}", "NAME_INVALID"),  # overlong
        (f"/v2/library/alpine/blobs/{DIGEST}/../x", "NAME_INVALID"),  # the registry would resolve it
        ("/v2/library/alpine/tags/%2E%2e/list", "NAME_INVALID"),
        ("/v2/x/blobs/uploads/./u", "NAME_INVALID"),
    ],
)
def test_refuses_malformed_paths(path, code):
    with pytest.raises(RouteError) as info:
        routes.parse(path)
    assert info.value.code == code


def test_registry_path_detection():
    assert routes.is_registry_path("/v2/")
    assert routes.is_registry_path("/v2?x")
    assert routes.is_registry_path("/v2/library/alpine/manifests/latest")
    assert not routes.is_registry_path("/v20/")
    assert not routes.is_registry_path("/token?scope=x")
    assert not routes.is_registry_path("/")
