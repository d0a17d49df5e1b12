"""addon/oci.py, the registry protocol: challenges (RFC 7235) table-driven and
under hypothesis, Basic credentials, token requests against the harness's real
token server (GET and containerd's OAuth2 POST), manifest digests, error bodies.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from addon import oci
from addon.oci import Challenge, bearer_challenge, parse_challenges
from addon.upstream import UpstreamClient
from tests.harness.tokenserver import TokenServer, decode_jwt

ROOT = Path(__file__).resolve().parents[1]

DOCKER_HUB = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/alpine:pull"')

# (WWW-Authenticate value(s), the challenges parsed from them)
WELL_FORMED = [
    (DOCKER_HUB, [Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                       "scope": "repository:library/alpine:pull"})]),
    # several challenges in one value (RFC 7235 4.1), and over several header lines
    ('Basic realm="x", Bearer realm="y",service="z"',
     [Challenge("basic", {"realm": "x"}), Challenge("bearer", {"realm": "y", "service": "z"})]),
    (['Basic realm="x"', 'Bearer realm="y",service="z"'],
     [Challenge("basic", {"realm": "x"}), Challenge("bearer", {"realm": "y", "service": "z"})]),
    # RFC 7235's own example: an escaped quote, an unquoted value, a second challenge
    ('Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
     [Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
      Challenge("basic", {"realm": "simple"})]),
    # case-insensitive scheme and parameter names; values keep their case
    ('BeArEr Realm="https://A/T", SERVICE="Reg"', [Challenge("bearer", {"realm": "https://A/T", "service": "Reg"})]),
    # quoted-pairs: \" and \\ ; a backslash before an ordinary character is that character
    (r'Bearer realm="r",service="say \"hi\" \\ \o/"', [Challenge("bearer", {"realm": "r", "service": 'say "hi" \\ o/'})]),
    # token (unquoted) values
    ("Bearer realm=r1,service=registry.example,x=a!#$%&'*+-.^_`|~9",
     [Challenge("bearer", {"realm": "r1", "service": "registry.example", "x": "a!#$%&'*+-.^_`|~9"})]),
    # token68 form, alone and before another challenge
    ("Basic Zm9vOmJhcg==", [Challenge("basic", {}, "Zm9vOmJhcg==")]),
    ('Negotiate a+b/c-d._~, Bearer realm="y"', [Challenge("negotiate", {}, "a+b/c-d._~"),
                                                  Challenge("bearer", {"realm": "y"})]),
    # commas (and a scheme-looking word) inside quoted values
    ('Bearer realm="https://a/t?x=1,2",scope="repository:a:pull,push, Basic realm=q"',
     [Challenge("bearer", {"realm": "https://a/t?x=1,2", "scope": "repository:a:pull,push, Basic realm=q"})]),
    # empty list elements, blanks around '=', an empty quoted value
    (' , Bearer ,realm = "x",, ,service= "y" , ,', [Challenge("bearer", {"realm": "x", "service": "y"})]),
    ('Bearer realm="x",error=""', [Challenge("bearer", {"realm": "x", "error": ""})]),
    # a scheme alone, then another
    ("Basic, Bearer realm=x", [Challenge("basic"), Challenge("bearer", {"realm": "x"})]),
    # tabs are whitespace; obs-text (latin-1 decoded bytes) is allowed inside quotes
    ('Bearer\trealm="caf\xe9"', [Challenge("bearer", {"realm": "caf\xe9"})]),
]

# Hostile or broken: never an exception, never a half-read challenge.
# (value, the challenges that survive: only complete ones before the fault)
MALFORMED = [
    ("", []),
    (None, []),
    (", ,\t,", []),
    ('Bearer realm="https://auth/token', []),  # unterminated quote
    ('Bearer realm="https://auth/token\\"', []),  # the last quote is escaped: still unterminated
    ('Basic realm="a", Bearer realm="b", service="c', [Challenge("basic", {"realm": "a"})]),
    ('Bearer realm="a",realm="https://elsewhere/"', []),  # a parameter twice: which realm?
    ('Bearer REALM="a", realm="b"', []),  # twice, in another case
    ('Bearer realm="a" "b"', []),  # garbage after a value
    ('Bearer realm="a"b', []),
    ('Bearer realm="a\x00b"', []),  # a control character inside quotes
    ('Bearer realm="a\nb"', []),
    ('Bearer realm="\u20ac"', []),  # not a byte: header values are latin-1
    ('realm="x"', []),  # parameters without a scheme
    ("Bearer =x", []),
    ("Bearer realm=,service=s", []),  # an empty unquoted value
    ('Basic abc=, realm="x"', []),  # a token68 and parameters in one challenge
    ('"Bearer" realm="x"', []),
    ("Bearer realm=a b", []),
    ('Bearer realm="' + "a" * 1_000_000 + '"', []),  # huge
    ("Bearer " + ",".join(f'p{i}="v"' for i in range(100_000)), []),  # huge, many parameters
    ('Bearer realm="x",' + " " * 20_000 + 'service="y"', []),  # huge by blanks
    ("\\" * 5000, []),
    ('"' * 5000, []),
]


@pytest.mark.parametrize("values, expected", WELL_FORMED, ids=lambda v: repr(v)[:40] if isinstance(v, str) else None)
def test_challenges_are_parsed(values, expected):
    assert parse_challenges(values) == expected


@pytest.mark.parametrize("values, expected", MALFORMED, ids=lambda v: repr(v)[:40] if isinstance(v, str) else None)
def test_malformed_challenges_give_no_challenge(values, expected):
    assert parse_challenges(values) == expected
    assert bearer_challenge(values) is None


@pytest.mark.parametrize("values, realm", [
    (DOCKER_HUB, "https://auth.docker.io/token"),
    ('Basic realm="x", Bearer realm="y",service="z"', "y"),  # Bearer need not come first
    (['Basic realm="x"', 'bearer realm="y"'], "y"),
    ('Bearer service="no realm", Bearer realm="second"', "second"),  # the first one that names a realm
    ('Bearer realm=""', None),
    ("Bearer", None),
    ('Basic realm="x"', None),
    ('Bearer xyz==', None),  # a token68 Bearer is a credential, not a challenge we can answer
])
def test_bearer_challenge_is_the_first_one_with_a_realm(values, realm):
    found = bearer_challenge(values)
    assert (found.realm if found else None) == realm


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.text(),
    st.text(alphabet=' \t,="\\=/+abBearerrealmsvic\x00\xe9\u20ac'),
    st.lists(st.text(alphabet=' \t,="\\abBearerrealm'), max_size=4),
))
@example('Bearer realm="\\')
@example("Bearer realm=\\")
@example('Bearer a="b", c')
def test_any_input_parses_without_raising(values):
    challenges = parse_challenges(values)
    assert all(c.scheme == c.scheme.lower() and all(k == k.lower() for k in c.params) for c in challenges)
    found = bearer_challenge(values)
    assert found is None or (found.scheme == "bearer" and found.realm)


_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,8}", fullmatch=True)
_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xff, blacklist_characters="\x7f"),
                  max_size=30)


@settings(max_examples=500)
@given(st.lists(st.tuples(_NAMES, st.dictionaries(_NAMES, _VALUES, max_size=4)), min_size=1, max_size=3))
def test_what_a_server_writes_is_what_is_read(challenges):
    """Challenges serialized as a server would (quoted, escaped) parse back exactly."""
    challenges = [(scheme, {k.lower(): v for k, v in params.items()}) for scheme, params in challenges]
    header = ", ".join(
        scheme + (" " + ", ".join(
            f'{name}="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for name, value in params.items()
        ) if params else "")
        for scheme, params in challenges)
    assert parse_challenges(header) == [Challenge(s.lower(), p) for s, p in challenges]


# -- Basic credentials ----------------------------------------------------------------

def test_basic_authorization():
    assert oci.basic_authorization("alice", "s3cret") == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert oci.basic_authorization("Aladdin", "open sesame") == "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="  # RFC 7617
    # RFC 7617 2.1's example of charset="UTF-8": "test" / "123£"
    assert oci.basic_authorization("test", "123\xa3") == "Basic dGVzdDoxMjPCow=="
    assert oci.basic_authorization("test", "123\xa3", charset="latin-1") == "Basic dGVzdDoxMjOj"
    assert oci.basic_authorization("u", "") == "Basic " + base64.b64encode(b"u:").decode()
    assert oci.basic_authorization("u", "pa:ss") == "Basic " + base64.b64encode(b"u:pa:ss").decode()
    for username, password in (("a:b", "x"), ("a\nb", "x"), ("a", "x\r\n"), ("a", "\x00")):
        with pytest.raises(ValueError):
            oci.basic_authorization(username, password)


# -- token requests ---------------------------------------------------------------------

def test_token_request_forms():
    challenge = bearer_challenge('Bearer realm="https://auth/t",service="reg",scope="repository:a:pull repository:b:pull"')
    get = oci.TokenRequest.for_challenge(challenge)
    assert get.query() == [("service", "reg"), ("scope", "repository:a:pull"), ("scope", "repository:b:pull")]
    assert oci.TokenRequest.for_challenge(challenge, scopes=["repository:c:pull"]).scopes == ("repository:c:pull",)
    assert oci.TokenRequest.from_query("service=reg&scope=repository:a:pull&scope=repository:b:pull") == get
    offline = oci.TokenRequest(service="reg", scopes=("s",), offline=True, client_id="docker")
    assert offline.query() == [("service", "reg"), ("scope", "s"), ("offline_token", "true"), ("client_id", "docker")]
    assert oci.TokenRequest.from_query("service=reg&scope=s&offline_token=true&client_id=docker") == offline
    with pytest.raises(ValueError):
        get.form()  # a GET has no OAuth2 form

    # containerd's OAuth2 POSTs (remotes/docker/auth/fetch.go)
    password = oci.TokenRequest(service="reg", scopes=("repository:a:pull", "repository:b:pull,push"),
                                grant_type="password", client_id="containerd-client",
                                username="alice", password="p&ss=word", offline=True)
    assert password.form() == [
        ("grant_type", "password"), ("service", "reg"), ("client_id", "containerd-client"),
        ("scope", "repository:a:pull repository:b:pull,push"), ("username", "alice"),
        ("password", "p&ss=word"), ("access_type", "offline")]
    assert oci.TokenRequest.from_form(password.encoded_form()) == password
    refresh = oci.TokenRequest(service="reg", grant_type="refresh_token", client_id="c", refresh_token="r1")
    assert refresh.form() == [("grant_type", "refresh_token"), ("service", "reg"), ("client_id", "c"),
                              ("refresh_token", "r1")]
    assert oci.TokenRequest.from_form(refresh.encoded_form().decode()) == refresh
    for body in (b"", b"grant_type=client_credentials&service=reg", b"\xff\xfe",
                 b"grant_type=password&" + b"&".join(b"scope=s%d" % i for i in range(oci.MAX_TOKEN_FIELDS))):
        with pytest.raises(ValueError):
            oci.TokenRequest.from_form(body)
    with pytest.raises(ValueError):
        oci.TokenRequest.from_query("&".join(f"scope=s{i}" for i in range(oci.MAX_TOKEN_FIELDS + 1)))
    assert "p&ss=word" not in repr(password) and "r1" not in repr(refresh)  # secrets stay out of logs


@pytest.mark.parametrize("body, expected", [
    (b'{"token": "t", "expires_in": 300, "issued_at": "2026-01-01T00:00:00Z"}',
     oci.Token("t", 300.0, None, "2026-01-01T00:00:00Z")),
    (b'{"access_token": "a", "refresh_token": "r"}', oci.Token("a", 60.0, "r")),  # OAuth2's name; 60 s default
    (b'{"token": "t", "access_token": "a"}', oci.Token("t")),
    (b'{"token": "", "access_token": "a", "expires_in": "300"}', oci.Token("a")),  # a string is no number
    (b'{"token": "t", "expires_in": 0}', oci.Token("t")),
    (b'{"token": "t", "expires_in": true}', oci.Token("t")),
    (b'{"token": "t", "expires_in": 1e300}', oci.Token("t")),
    (b'{"token": "t", "refresh_token": 5}', oci.Token("t")),
])
def test_token_answers(body, expected):
    assert oci.parse_token_answer(body) == expected


@pytest.mark.parametrize("body", [
    b"", b"null", b"[]", b'"token"', b"{}", b'{"token": null}', b'{"token": 5}', b'{"token": "a\\r\\nX-Evil: 1"}',
    b"<html>", b"\xff", b'{"token": "' + b"a" * (oci.MAX_TOKEN_ANSWER + 1) + b'"}',
])
def test_token_answers_without_a_usable_token(body):
    with pytest.raises(oci.TokenError):
        oci.parse_token_answer(body)


@pytest.fixture
def token_server():
    with TokenServer(users={"alice": "wonder\xa3land"}, private_repos={"acme/private": {"alice"}}) as server:
        yield server


def test_tokens_from_a_real_token_server(token_server):
    session = requests.Session()
    session.trust_env = False
    realm = token_server.realm
    challenge = bearer_challenge(f'Basic realm="other", Bearer realm="{realm}",service="{token_server.service}",'
                                 'scope="repository:acme/private:pull"')
    request = oci.TokenRequest.for_challenge(challenge)

    anonymous = oci.fetch_token(session, challenge.realm, request, timeout=30)
    assert anonymous.expires_in == token_server.token_ttl and anonymous.refresh_token is None
    assert decode_jwt(anonymous.token)[1]["access"] == [{"type": "repository", "name": "acme/private", "actions": []}]

    basic = oci.basic_authorization("alice", "wonder\xa3land")  # UTF-8, as the harness (and Go servers) decode it
    alice = oci.fetch_token(session, realm, request, authorization=basic, timeout=30)
    assert decode_jwt(alice.token)[1]["access"][0]["actions"] == ["pull"]
    assert alice.authorization == "Bearer " + alice.token

    with pytest.raises(oci.TokenError) as refused:
        oci.fetch_token(session, realm, request, authorization=oci.basic_authorization("alice", "wrong"), timeout=30)
    assert refused.value.status == 401

    # containerd's OAuth2 POST: a password grant asking for a refresh token, then that refresh token
    post = oci.TokenRequest.for_challenge(challenge, grant_type="password", client_id="containerd-client",
                                          username="alice", password="wonder\xa3land", offline=True)
    first = oci.fetch_token(session, realm, post, timeout=30)
    assert first.refresh_token and decode_jwt(first.token)[1]["sub"] == "alice"
    again = oci.fetch_token(session, realm, oci.TokenRequest.for_challenge(
        challenge, grant_type="refresh_token", client_id="containerd-client", refresh_token=first.refresh_token),
        timeout=30)
    assert decode_jwt(again.token)[1]["access"][0]["actions"] == ["pull"]
    assert [(r.method, r.grant, r.username, r.scopes, r.status) for r in token_server.requests] == [
        ("GET", "anonymous", None, ["repository:acme/private:pull"], 200),
        ("GET", "basic", "alice", ["repository:acme/private:pull"], 200),
        ("GET", "basic", "alice", ["repository:acme/private:pull"], 401),
        ("POST", "password", "alice", ["repository:acme/private:pull"], 200),
        ("POST", "refresh_token", "alice", ["repository:acme/private:pull"], 200),
    ]
    # The answer itself, unread, for a caller that relays it (issue #13)
    response = oci.request_token(session, realm, request, timeout=30)
    assert response.status_code == 200 and oci.read_token_answer(response).token


def test_the_mirrors_anonymous_token_reads_every_challenge(token_server):
    """The access gate's public probe: a Bearer challenge after a Basic one,
    in another case, over two header lines, is still answered."""
    client = UpstreamClient()
    try:
        for challenge in (f'Basic realm="x", Bearer realm="{token_server.realm}",service="{token_server.service}"',
                          ['Basic realm="x"', f'BEARER Realm={json.dumps(token_server.realm)}']):
            token = client.anonymous_token(challenge, "library/alpine")
            assert token, challenge
            assert decode_jwt(token)[1]["access"] == [{"type": "repository", "name": "library/alpine",
                                                       "actions": ["pull"]}]
        assert client.anonymous_token('Bearer realm="file:///etc/passwd"', "library/alpine") is None
        assert client.anonymous_token('Bearer realm="unterminated', "library/alpine") is None
        token_server.set_down(True)
        with pytest.raises(requests.ConnectionError):  # unreachable is not "no token": the caller knows nothing
            client.anonymous_token(f'Bearer realm="{token_server.realm}"', "library/alpine")
    finally:
        client.close()


# -- manifests and errors -------------------------------------------------------------

def test_check_manifest():
    body = b'{"schemaVersion": 2}'
    digest = oci.sha256_digest(body)
    headers = {"Content-Type": f"{oci.OCI_MANIFEST}; charset=utf-8", "Docker-Content-Digest": digest}
    assert oci.check_manifest(body, headers, "latest") == oci.Manifest(digest, oci.OCI_MANIFEST, body)
    assert oci.check_manifest(body, {}, digest) == oci.Manifest(digest, "", body)
    with pytest.raises(oci.ManifestMismatch, match="the body's digest is"):
        oci.check_manifest(body, headers, "sha256:" + "0" * 64)
    with pytest.raises(oci.ManifestMismatch, match="Docker-Content-Digest sha256:0+ but the body is"):
        oci.check_manifest(body, {"Docker-Content-Digest": "sha256:" + "0" * 64}, "latest")
    big = b" " * (oci.MAX_MANIFEST + 1)
    assert oci.verified_manifest(big, {}, "latest") is None
    assert oci.verified_manifest(body, headers, digest).digest == digest


def test_error_body():
    assert json.loads(oci.error_body("BLOB_UNKNOWN", "blob unknown to registry")) == \
        {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry"}]}
    assert json.loads(oci.error_body("DENIED", "no", 'a "detail"')) == \
        {"errors": [{"code": "DENIED", "message": "no", "detail": 'a "detail"'}]}


def test_media_types():
    assert oci.ALL_MANIFEST_TYPES.split(", ") == [oci.OCI_MANIFEST, oci.OCI_INDEX, oci.DOCKER_MANIFEST,
                                                  oci.DOCKER_LIST, "*/*"]
    assert set(oci.INDEX_TYPES) | set(oci.IMAGE_MANIFEST_TYPES) == set(oci.ALL_MANIFEST_TYPES.split(", ")[:4])


def test_oci_imports_nothing_but_the_standard_library():
    code = ("import sys; import addon.oci; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mitmproxy', 'requests', 'urllib3', 'diskcache')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
