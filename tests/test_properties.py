"""Property-based tests (hypothesis) of everything that parses client input."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from addon import routes
from addon.blobserver import _parse_range
from addon.layout import parse_size
from addon.routes import Kind, RouteError

# Characters that reach a request path in practice, including the tricky ones.
PATH_CHARS = st.sampled_from(list("abcz09._-/:%2fFeE?=&+ ~@") + ["..", "%2e", "%2F", "sha256:", "blobs", "manifests"])
COMPONENT = st.from_regex(re.compile(r"[a-z0-9]{1,5}(?:[._-][a-z0-9]{1,5}){0,2}"), fullmatch=True)
NAME = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join).filter(lambda n: len(n) <= routes.MAX_NAME_LENGTH)
SHA256 = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PATH_CHARS, max_size=40).map("".join))
def test_parse_accepts_or_refuses_cleanly(suffix):
    """Any path: a Route or a RouteError with an OCI code, never anything else,
    and whatever is accepted as a blob is safe to use as a key or URL."""
    path = "/v2/" + suffix
    try:
        route = routes.parse(path)
    except RouteError as exc:
        assert exc.code in ("NAME_INVALID", "DIGEST_INVALID", "MANIFEST_INVALID")
        return
    if route.kind in (Kind.BLOB, Kind.MANIFEST):
        assert routes.NAME_RE.fullmatch(route.name)
        assert ".." not in route.name.split("/") and "%" not in route.name and "//" not in route.name
    if route.kind is Kind.BLOB:
        assert routes.SHA256_RE.fullmatch(route.reference)


@given(NAME, SHA256, st.sampled_from(["", "?ns=docker.io", "?ns=ghcr.io&x=1"]))
def test_valid_blob_paths_round_trip(name, digest, query):
    route = routes.parse(f"/v2/{name}/blobs/{digest}{query}")
    assert (route.kind, route.name, route.reference) == (Kind.BLOB, name, digest)


@given(NAME, st.text(min_size=1, max_size=300))
def test_any_reference_is_either_valid_or_refused(name, reference):
    if "/" in reference or "?" in reference or "#" in reference:
        return
    try:
        route = routes.parse(f"/v2/{name}/manifests/{reference}")
    except RouteError:
        return
    assert route.reference == reference
    assert routes.TAG_RE.fullmatch(reference) or routes.SHA256_RE.fullmatch(reference)


class _Recording:
    """Stands in for a compiled regex, recording how long its inputs were."""

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern
        self.lengths: list[int] = []

    def fullmatch(self, text: str):
        self.lengths.append(len(text))
        return self.pattern.fullmatch(text)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=1, max_value=5000), st.sampled_from(["a-", "a.", "a_", "a/", "-", "a__"]))
def test_hostile_names_never_reach_a_regex_longer_than_the_caps(monkeypatch, repeat, unit):
    """The name grammar could backtrack on long hostile input: it must only
    ever see names within MAX_NAME_LENGTH, and paths over MAX_PATH_LENGTH
    no regex at all (a bound on work, where a time limit would be flaky)."""
    name_re, object_re = _Recording(routes.NAME_RE), _Recording(routes._OBJECT_RE)
    monkeypatch.setattr(routes, "NAME_RE", name_re)
    monkeypatch.setattr(routes, "_OBJECT_RE", object_re)
    path = "/v2/" + unit * repeat + "!/blobs/sha256:" + "a" * 64
    try:
        routes.parse(path)
    except RouteError:
        pass
    assert all(n <= routes.MAX_NAME_LENGTH for n in name_re.lengths)
    assert all(n <= routes.MAX_PATH_LENGTH for n in object_re.lengths)
    if len(path) > routes.MAX_PATH_LENGTH:
        assert object_re.lengths == [] and name_re.lengths == []


@given(st.text(max_size=40), st.integers(min_value=1, max_value=10**12))
def test_range_parsing_stays_inside_the_blob(header, size):
    parsed = _parse_range(header, size)
    if isinstance(parsed, tuple):
        start, end = parsed
        assert 0 <= start < end <= size


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**9),
       st.integers(min_value=1, max_value=10**9))
def test_numeric_ranges(first, last, size):
    parsed = _parse_range(f"bytes={first}-{last}", size)
    if first >= size or last < first:
        assert parsed == "unsatisfiable"
    else:
        assert parsed == (first, min(last + 1, size))


@example("inf")
@example("nan")
@example("1e400")
@example("-5g")
@given(st.text(max_size=20))
def test_size_option_parses_or_explains(text):
    try:
        assert parse_size(text) > 0
    except ValueError as exc:
        assert "size" in str(exc)
