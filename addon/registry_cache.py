"""mitmproxy entry point: `mitmdump -s addon/registry_cache.py`.

mitmproxy loads this file as a standalone script, so it puts the checkout on
sys.path and imports the package from there.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addon.mirror import RegistryCache  # noqa: E402

addons = [RegistryCache()]
