"""Test-only mitmproxy addon: writes what the mirror marked on each flow.

Loaded next to the mirror (`-s tests/harness/flow_recorder.py --set
flow_record_file=PATH`), it appends one JSON line per response, error and
update hook, so tests can check the marks mitmweb would show without a UI.
"""

import json
import sys
from pathlib import Path

from mitmproxy import ctx, flowfilter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from addon.flows import HIT_FILTER, METADATA_KEY  # noqa: E402


class FlowRecorder:
    def load(self, loader):
        loader.add_option("flow_record_file", str, "", "JSON-lines file for flow marks")

    def _write(self, flow, event: str) -> None:
        if not ctx.options.flow_record_file:
            return
        record = {
            "event": event,
            "id": flow.id,
            "method": flow.request.method,
            "url": flow.request.pretty_url,
            "original_url": flow.metadata.get(METADATA_KEY + ".original_url"),
            "status": flow.response.status_code if flow.response else None,
            "marked": flow.marked,
            "comment": flow.comment,
            "outcome": flow.metadata.get(METADATA_KEY),
            "hit_filter": flowfilter.match(HIT_FILTER, flow),
        }
        with open(ctx.options.flow_record_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def response(self, flow):
        self._write(flow, "response")

    def error(self, flow):
        self._write(flow, "error")

    def update(self, flows):
        for flow in flows:
            self._write(flow, "update")


addons = [FlowRecorder()]
