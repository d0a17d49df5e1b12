"""mitmproxy's hook dispatch, without its cost for addons that lack the hook.

mitmproxy runs each hook of each flow (requestheaders, request,
responseheaders, response) and each log line's add_log by walking every addon
of the process, 36 in mitmdump, and for each one entering a context manager, a
coroutine and two generators, whether it has that hook or not
(AddonManager.trigger_event and trigger). Most have none: 3 to 13 have a
given flow hook. With 32 clients resolving an image (four small requests
each) on loopback, that walk was about 40% of mitmdump's one thread (a py-spy
profile), and the mirror, bound by that thread, managed 0.59x the upstream's
resolutions/s; with this module (and answers' headers made once), 0.82x in
a full benchmark run (README, Performance).

`install()` replaces those two methods with ones that first look whether an
addon or one of its sub-addons has the hook right now (getattr, as mitmproxy
does), skip it if not, and otherwise invoke it exactly as mitmproxy does:
its own invoke_addon under its own safecall, in chain order (an error is
logged and the next addon runs; AddonHalt ends the event; sub-addons an
addon adds in that hook get the event too). It installs only over the code it
was written against (the source of both methods is checked; requirements.txt
pins that release), and leaves any other mitmproxy as it is.
"""

from __future__ import annotations

import hashlib
import inspect
import logging

from mitmproxy import addonmanager, exceptions, hooks

log = logging.getLogger(__name__)

# sha256 of the source of AddonManager.trigger_event and trigger in mitmproxy 12.3.1
KNOWN_SOURCE = "6d7757e7a1506882afc9e327e1a3056d9229415798f0236c739ca3ea4f726316"


# mitmproxy's own, as imported (tests compare the two)
MITMPROXY_TRIGGER_EVENT = addonmanager.AddonManager.trigger_event
MITMPROXY_TRIGGER = addonmanager.AddonManager.trigger


def _has_hook(addon, name: str) -> bool:
    """Would mitmproxy find hook `name` on addon or its sub-addons (traverse, _iter_hooks)?"""
    if getattr(addon, name, None):
        return True
    return hasattr(addon, "addons") and any(_has_hook(child, name) for child in addon.addons)


async def trigger_event(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    """AddonManager.trigger_event, skipping the addons without the hook."""
    name = event.name
    for addon in self.chain:
        if not _has_hook(addon, name):
            continue
        try:
            with addonmanager.safecall():
                await self.invoke_addon(addon, event)
        except exceptions.AddonHalt:
            return


def trigger(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    """AddonManager.trigger (the synchronous one: add_log, update), skipping the addons without the hook."""
    name = event.name
    for addon in self.chain:
        if not _has_hook(addon, name):
            continue
        try:
            with addonmanager.safecall():
                self.invoke_addon_sync(addon, event)
        except exceptions.AddonHalt:
            return


def source_hash() -> str:
    """What mitmproxy's own two methods are (the ones install() replaces)."""
    return hashlib.sha256((inspect.getsource(MITMPROXY_TRIGGER_EVENT) + inspect.getsource(MITMPROXY_TRIGGER)).encode()).hexdigest()


def install() -> bool:
    """Use this dispatch in this process; False (mitmproxy unchanged) if its code is not the known one."""
    manager = addonmanager.AddonManager
    if manager.trigger_event is trigger_event:
        return True
    try:
        known = source_hash() == KNOWN_SOURCE
    except (OSError, TypeError):  # no source to check
        known = False
    if not known:
        log.info("registry-cache: mitmproxy's hook dispatch is not the one measured; left as it is")
        return False
    manager.trigger_event = trigger_event
    manager.trigger = trigger
    return True
