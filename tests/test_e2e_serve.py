"""End to end: the README's own command, scripts/serve, runs the mirror
(mitmdump, or mitmweb with --web) with the arguments it is given."""

from __future__ import annotations

import requests

from tests.harness.fresh import fresh_image
from tests.harness.mirror import ROOT, Mirror
from tests.harness.registryproc import free_port
from tests.harness.v2client import RegistryClient

WAIT = 60


class ServedMirror(Mirror):
    """The harness's Mirror, started through scripts/serve instead of mitmdump."""

    def __init__(self, *args, web: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.web = web
        self.web_port = free_port()

    def command(self) -> list[str]:
        mitmdump_args = super().command()[3:]  # what follows "mitmdump -s addon/registry_cache.py"
        if not self.web:
            return ["bash", str(ROOT / "scripts" / "serve"), *mitmdump_args]
        return ["bash", str(ROOT / "scripts" / "serve"), "--web", *mitmdump_args,
                "--set", f"web_port={self.web_port}", "--set", "web_host=127.0.0.1",
                "--set", "web_open_browser=false"]


def test_scripts_serve_runs_the_mirror_with_its_arguments(tmp_path, upstream):
    image = fresh_image(upstream, 400_000)
    with ServedMirror(tmp_path / "m", [f"reverse:{upstream.url}"]) as mirror:
        assert mirror.command()[1].endswith("scripts/serve")
        client = RegistryClient(mirror.url)
        assert client.pull(image.repo, image.tag).layers == image.layers
        mirror.wait_stored([d for d, _ in image.blobs], WAIT)
        upstream.reset_counters()
        assert client.pull(image.repo, image.tag).layers == image.layers
        assert upstream.counters.blob_bytes == 0


def test_scripts_serve_web_runs_mitmweb(tmp_path, upstream):
    image = fresh_image(upstream, 300_000)
    with ServedMirror(tmp_path / "m", [f"reverse:{upstream.url}"], web=True) as mirror:
        line = mirror.wait_for_log(rf"Web server listening at (http://127\.0\.0\.1:{mirror.web_port}/\S*)", WAIT)
        assert requests.get(line.group(1), timeout=WAIT).status_code == 200  # the web UI answers
        assert RegistryClient(mirror.url).pull(image.repo, image.tag).layers == image.layers
