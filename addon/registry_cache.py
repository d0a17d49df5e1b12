"""mitmproxy entry point: `mitmdump -s addon/registry_cache.py`.

mitmproxy loads this file as a standalone script, so it puts the checkout on
sys.path and imports the package from there. The mirror comes first: the
body streaming addon acts on what it decided (flows.passes_through).
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addon.mirror import RegistryCache  # noqa: E402
from addon.passthrough import BodyStreaming  # noqa: E402

addons = [RegistryCache(), BodyStreaming()]
