"""End to end: an account of the mirror's own (upstream_credentials) makes the
pulls of public images, so they count against it; private images stay
exactly as private as without it."""

from __future__ import annotations

import base64
import json
import os

import pytest
import requests

from tests.harness.fresh import fresh_image, fresh_layer, unique_seed
from tests.harness.images import push_image
from tests.harness.mirror import Mirror
from tests.harness.upstream import ALICE, BOB
from tests.harness.v2client import PULL_ERRORS, RegistryClient

WAIT = 60


@pytest.fixture
def accounts_file(tmp_path, upstream_session):
    """alice's account, for the harness upstream (the mirror's reverse-mode upstream)."""
    path = tmp_path / "accounts.json"
    auth = base64.b64encode(f"{ALICE[0]}:{ALICE[1]}".encode()).decode()
    path.write_text(json.dumps({"auths": {upstream_session.host_port: {"auth": auth}}}))
    os.chmod(path, 0o600)
    return path


def manifest_gets(upstream, repo):
    return [r for r in upstream.counters.requests
            if r.method == "GET" and r.path.startswith(f"/v2/{repo}/manifests/")]


def test_pulls_of_public_images_are_made_with_the_mirrors_account(tmp_path, upstream, accounts_file):
    image = fresh_image(upstream, 300_000)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"],
                options={"upstream_credentials": str(accounts_file)}) as mirror:
        assert RegistryClient(mirror.url).pull(image.repo, image.tag).layers == image.layers  # an anonymous client
    gets = manifest_gets(upstream, image.repo)
    assert gets and all(r.token_subject == "alice" for r in gets if r.status == 200), gets
    assert "can be read by other users" not in "\n".join(mirror.lines)


def test_a_private_image_is_never_fetched_with_the_mirrors_account_for_a_client(tmp_path, upstream, accounts_file):
    private = push_image(upstream.url, "acme/private", f"t{unique_seed()}", [fresh_layer(200_000)], auth=ALICE)
    layer, _ = private.layers[0]
    upstream.reset_counters()
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"],
                options={"upstream_credentials": str(accounts_file)}) as mirror:
        for user in ((), BOB):  # anonymous, and a user the upstream refuses
            client = RegistryClient(mirror.url, *user)
            with pytest.raises(PULL_ERRORS) as refused:
                client.pull(private.repo, private.tag)
            assert refused.value.status in (401, 403, 404)
            r = client.request("GET", f"/v2/{private.repo}/blobs/{layer}")
            assert r.status_code in (401, 403, 404)
        assert upstream.counters.blob_bytes == 0
        assert not any(r.token_subject == "alice" for r in upstream.counters.requests), "alice's token was used"
        # alice herself pulls it, with her own token
        assert RegistryClient(mirror.url, *ALICE).pull(private.repo, private.tag).layers == private.layers


def test_an_accounts_file_others_can_read_is_warned_about(tmp_path, upstream, accounts_file):
    os.chmod(accounts_file, 0o644)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"],
                options={"upstream_credentials": str(accounts_file)}) as mirror:
        mirror.wait_for_log(r"can be read by other users \(mode 644\); chmod 600 it", WAIT)
        assert requests.get(f"{mirror.url}/_registry_cache/stats", timeout=WAIT).status_code == 200
    assert ALICE[1] not in "\n".join(mirror.lines)  # never logged
