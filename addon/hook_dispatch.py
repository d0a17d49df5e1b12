"""mitmproxy's hook dispatch, without its cost for addons that lack the hook.

mitmproxy runs each hook of each flow (requestheaders, request,
responseheaders, response, and an `update` after each) and each log line's
add_log by walking every addon of the process, 36 in mitmdump, and for each
one entering a context manager, a coroutine and two generators, whether it
has that hook or not (AddonManager.trigger_event and trigger). Most have
none: 3 to 13 have a given flow hook. With 32 clients resolving an image
(four small requests each) on loopback, that walk was about 40% of
mitmdump's one thread (a py-spy profile), and the mirror, bound by that
thread, managed 0.59x the upstream's resolutions/s (README, Performance).

`install()` replaces those two methods with ones that visit, per hook name,
only the addons of the chain found to have it, or to have sub-addons, and do
with each what mitmproxy does: in chain order, the addon then its sub-addons
depth first (each one's `addons` read after its hook ran, so one added
during the event gets it), the hook looked up as it is called, with the
event's arguments; an error logged as mitmproxy's safecall logs it (an
error in a hook with the same traceback) and the next addon of the chain
run; AddonHalt ending the event. Which addons to visit is remembered per chain and found again:
- when the chain changes (AddonManager.add appends to it, remove replaces it);
  an addon added to the chain during an event gets that event, as in mitmproxy;
- after a lifecycle event (load, configure, running, done), where addons set
  themselves up, and which visit every addon;
- addons with sub-addons (the script loader, whose scripts are reloaded and
  replaced, and any addon that manages others) are visited at each event,
  their sub-addons looked through then.
What it cannot see: an addon of the chain that gives itself a hook or
sub-addons (sets an attribute of that name, or `addons`) outside a
lifecycle event gets that hook only from the next chain change or lifecycle
event on (README, Limits). mitmproxy's own addons do not; scripts are
sub-addons of its script loader.

It installs only over the code it was written against (the source of the
mitmproxy functions it replaces or repeats is checked; requirements.txt pins
that release), and leaves any other mitmproxy as it is.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
import types

from mitmproxy import addonmanager, exceptions, hooks

log = logging.getLogger(__name__)

# sha256 of the source of the mitmproxy code below (WATCHED) in mitmproxy 12.3.1
KNOWN_SOURCE = "d9f1db59b750eefdfa82c339280bbdc4f115f9cbda206f938c7eed4a600dafc0"

# mitmproxy's own, as imported (tests compare the two)
MITMPROXY_TRIGGER_EVENT = addonmanager.AddonManager.trigger_event
MITMPROXY_TRIGGER = addonmanager.AddonManager.trigger

# What this module replaces (the first two) or does as they do (the rest: the walk, the
# error handling, how the chain changes): a change in any of them in a new release leaves
# mitmproxy's dispatch in place.
WATCHED = (MITMPROXY_TRIGGER_EVENT, MITMPROXY_TRIGGER, addonmanager.AddonManager.invoke_addon,
           addonmanager.AddonManager.invoke_addon_sync, addonmanager.AddonManager._iter_hooks,
           addonmanager.AddonManager.add, addonmanager.AddonManager.remove, addonmanager.AddonManager.clear,
           addonmanager.traverse, addonmanager.safecall, addonmanager.cut_traceback)

LIFECYCLE = frozenset({"load", "configure", "running", "done"})  # addons set themselves up here
_PLAN = "_registry_cache_hook_plan"  # the AddonManager attribute holding its Plan


class Plan:
    """For one chain (the list object, at one length): per hook name, the
    addons to visit: those that have the hook, and those with sub-addons
    (which are looked through at each event)."""

    __slots__ = ("chain", "length", "visits")

    def __init__(self, chain: list) -> None:
        self.chain, self.length = chain, len(chain)
        self.visits: dict[str, tuple] = {}

    def find(self, name: str) -> tuple:
        visits = self.visits[name] = tuple(addon for addon in self.chain if _may_have(addon, name))
        return visits


def _may_have(addon, name: str) -> bool:
    """Whether addon has the hook or sub-addons. One whose attributes raise is
    visited: the walk then logs the error under that addon, as mitmproxy does,
    instead of the event failing for all."""
    try:
        return bool(getattr(addon, name, None)) or hasattr(addon, "addons")
    except Exception:
        return True


def _visits(manager: addonmanager.AddonManager, name: str) -> tuple:
    plan = manager.__dict__.get(_PLAN)
    chain = manager.chain
    if plan is None or plan.chain is not chain or plan.length != len(chain):
        plan = manager.__dict__[_PLAN] = Plan(chain)
    visits = plan.visits.get(name)
    return plan.find(name) if visits is None else visits


def forget(manager: addonmanager.AddonManager) -> None:
    """Find every addon's hooks again at the next event."""
    manager.__dict__.pop(_PLAN, None)


def _log_error(frame_name: str) -> None:
    """Log the exception being handled as mitmproxy's safecall does, the
    traceback starting below our frame as it starts below its invoke_addon."""
    etype, value, tb = sys.exc_info()
    tb = addonmanager.cut_traceback(tb, frame_name)
    addonmanager.logger.error(f"Addon error: {value}", exc_info=(etype, value, tb))


def _not_callable(name: str, addon) -> exceptions.AddonManagerError:
    return exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")


def _tops(manager: addonmanager.AddonManager, name: str):
    """The addons of the chain to visit for hook `name`, in chain order, then
    those added to the chain while they ran (they get the event too, as in
    mitmproxy). A lifecycle event visits every addon."""
    chain = manager.chain
    start = 0
    while True:
        length = len(chain)
        yield from chain[start:] if start or name in LIFECYCLE else _visits(manager, name)
        if len(chain) == length:
            return
        start = length


def _handlers(top, name: str):
    """(addon, hook) for top, then its sub-addons depth first, as mitmproxy's
    invoke_addon finds them (with its traverse: each one's `addons` read
    after its hook ran). A module of that name is skipped; anything else not
    callable is refused."""
    for addon in addonmanager.traverse((top,)) if hasattr(top, "addons") else (top,):
        func = getattr(addon, name, None)
        if not func:
            continue
        if not callable(func):
            if isinstance(func, types.ModuleType):
                continue
            raise _not_callable(name, addon)
        yield addon, func


async def trigger_event(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    """AddonManager.trigger_event, visiting only the addons with the hook.

    Each addon of the chain visited is walked under one error handler, as
    under mitmproxy's one safecall per addon of the chain."""
    name, args = event.name, None
    try:
        for top in _tops(self, name):
            try:
                for _addon, func in _handlers(top, name):
                    if args is None:
                        args = event.args()
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception:
                _log_error("trigger_event")
    finally:
        if name in LIFECYCLE:
            forget(self)


def trigger(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    """AddonManager.trigger (the synchronous one: add_log, configure, update),
    visiting only the addons with the hook, as trigger_event does."""
    name, args = event.name, None
    try:
        for top in _tops(self, name):
            try:
                for addon, func in _handlers(top, name):
                    if inspect.iscoroutinefunction(func):
                        raise exceptions.AddonManagerError(
                            f"Async handler {name} ({addon}) cannot be called from sync context")
                    if args is None:
                        args = event.args()
                    func(*args)
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception:
                _log_error("trigger")
    finally:
        if name in LIFECYCLE:
            forget(self)


def source_hash() -> str:
    """What mitmproxy's own code is (the functions install() replaces or repeats)."""
    return hashlib.sha256("".join(inspect.getsource(f) for f in WATCHED).encode()).hexdigest()


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
