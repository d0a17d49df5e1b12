"""mitmproxy's hook dispatch, without its cost for addons that lack the hook.

mitmproxy runs each hook of each flow (requestheaders, request,
responseheaders, response, and an `update` after each) and each log line's
add_log by walking every addon of the process, 34 in mitmdump, and for each
one entering a context manager, a coroutine and two generators, whether it
has that hook or not (AddonManager.trigger_event and trigger). Most have
none: 3 to 13 have a given flow hook. With 32 clients resolving an image
(four small requests each) on loopback, that walk was about 40% of
mitmdump's one thread (a py-spy profile), and the mirror, bound by that
thread, managed 0.59x the upstream's resolutions/s (README, Performance).

`install()` replaces those two methods with ones that visit, per hook name,
only the addons of the chain found to have it, and call each as mitmproxy
does: in chain order, the hook looked up when it is called, its arguments
as the event gives them, an error logged as mitmproxy logs it (traceback
and all) and the next addon run, AddonHalt ending the event. Which addons
have a hook is remembered per chain, and found again:
- when the chain changes (AddonManager.add appends to it, remove replaces it;
  an addon added to the chain during an event gets that event, as in mitmproxy);
- after a lifecycle event (load, configure, running, done), where addons set
  themselves up, and which are dispatched as before, looking at every addon;
- never for an addon with sub-addons (`addons`: the script loader, whose
  scripts are reloaded and replaced, and any addon that manages others):
  its tree is looked through at each event, and mitmproxy's own
  invoke_addon calls it, so a sub-addon added meanwhile, even during the
  event, is called, and a removed one is not.
What it cannot see: an addon without sub-addons that gives itself a hook
(sets an attribute of that name) outside a lifecycle event is called for
that hook from the next chain change or lifecycle event on (README, Limits).

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

# What this module replaces (the first two) or does as they do (the rest): a
# change in any of them in a new release leaves mitmproxy's dispatch in place.
WATCHED = (MITMPROXY_TRIGGER_EVENT, MITMPROXY_TRIGGER, addonmanager.AddonManager.invoke_addon,
           addonmanager.AddonManager.invoke_addon_sync, addonmanager.AddonManager._iter_hooks,
           addonmanager.AddonManager.add, addonmanager.AddonManager.remove, addonmanager.AddonManager.clear,
           addonmanager.traverse, addonmanager.safecall, addonmanager.cut_traceback)

LIFECYCLE = frozenset({"load", "configure", "running", "done"})  # addons set themselves up here
_PLAN = "_registry_cache_hook_plan"  # the AddonManager attribute holding its Plan


class Plan:
    """For one chain (the list object, at one length): per hook name, the
    addons to visit, each with whether it has sub-addons (looked through
    at each event) or not (has the hook itself)."""

    __slots__ = ("chain", "length", "visits")

    def __init__(self, chain: list) -> None:
        self.chain, self.length = chain, len(chain)
        self.visits: dict[str, tuple[tuple[object, bool], ...]] = {}

    def find(self, name: str) -> tuple[tuple[object, bool], ...]:
        visits = self.visits[name] = tuple(
            (addon, nested) for addon in self.chain
            if (nested := hasattr(addon, "addons")) or getattr(addon, name, None))
        return visits


def _visits(manager: addonmanager.AddonManager, name: str) -> tuple[tuple[object, bool], ...]:
    plan = manager.__dict__.get(_PLAN)
    chain = manager.chain
    if plan is None or plan.chain is not chain or plan.length != len(chain):
        plan = manager.__dict__[_PLAN] = Plan(chain)
    visits = plan.visits.get(name)
    return plan.find(name) if visits is None else visits


def forget(manager: addonmanager.AddonManager) -> None:
    """Find every addon's hooks again at the next event."""
    manager.__dict__.pop(_PLAN, None)


def _has_hook(addon, name: str) -> bool:
    """Would mitmproxy find hook `name` on addon or its sub-addons (traverse, _iter_hooks)?"""
    if getattr(addon, name, None):
        return True
    return hasattr(addon, "addons") and any(_has_hook(child, name) for child in addon.addons)


def _log_error(frame_name: str) -> None:
    """Log the exception being handled as mitmproxy's safecall does, the
    traceback starting below our frame as it starts below its invoke_addon."""
    etype, value, tb = sys.exc_info()
    tb = addonmanager.cut_traceback(tb, frame_name)
    addonmanager.logger.error(f"Addon error: {value}", exc_info=(etype, value, tb))


async def trigger_event(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    """AddonManager.trigger_event, visiting only the addons with the hook."""
    name = event.name
    if name in LIFECYCLE:
        try:
            await _trigger_event_each(self, event, self.chain, 0)
        finally:
            forget(self)
        return
    chain = self.chain
    length = len(chain)
    args = None
    for addon, nested in _visits(self, name):
        if nested:
            if _has_hook(addon, name):
                try:
                    with addonmanager.safecall():
                        await self.invoke_addon(addon, event)
                except exceptions.AddonHalt:
                    return
            continue
        func = getattr(addon, name, None)
        if not func or not callable(func):  # gone since, or not a function: mitmproxy's own way
            try:
                with addonmanager.safecall():
                    await self.invoke_addon(addon, event)
            except exceptions.AddonHalt:
                return
            continue
        if args is None:
            args = event.args()
        try:
            result = func(*args)
            if result is not None and inspect.isawaitable(result):
                await result
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception:
            _log_error("trigger_event")
    if len(chain) > length:  # addons added to the chain during this event get it too
        await _trigger_event_each(self, event, chain, length)


async def _trigger_event_each(self: addonmanager.AddonManager, event: hooks.Hook, chain: list, start: int) -> None:
    """mitmproxy's walk from chain[start] on, skipping the addons without the hook."""
    name = event.name
    for addon in chain[start:] if start else chain:
        if not _has_hook(addon, name):
            continue
        try:
            with addonmanager.safecall():
                await self.invoke_addon(addon, event)
        except exceptions.AddonHalt:
            return


def trigger(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    """AddonManager.trigger (the synchronous one: add_log, configure, update),
    visiting only the addons with the hook."""
    name = event.name
    if name in LIFECYCLE:
        try:
            _trigger_each(self, event, self.chain, 0)
        finally:
            forget(self)
        return
    chain = self.chain
    length = len(chain)
    args = None
    for addon, nested in _visits(self, name):
        func = None if nested else getattr(addon, name, None)
        if nested or not func or not callable(func) or inspect.iscoroutinefunction(func):
            # sub-addons, a hook gone since, or one to refuse: mitmproxy's own way
            if _has_hook(addon, name):
                try:
                    with addonmanager.safecall():
                        self.invoke_addon_sync(addon, event)
                except exceptions.AddonHalt:
                    return
            continue
        if args is None:
            args = event.args()
        try:
            func(*args)
        except exceptions.AddonHalt:
            return
        except exceptions.OptionsError:
            raise
        except Exception:
            _log_error("trigger")
    if len(chain) > length:
        _trigger_each(self, event, chain, length)


def _trigger_each(self: addonmanager.AddonManager, event: hooks.Hook, chain: list, start: int) -> None:
    name = event.name
    for addon in chain[start:] if start else chain:
        if not _has_hook(addon, name):
            continue
        try:
            with addonmanager.safecall():
                self.invoke_addon_sync(addon, event)
        except exceptions.AddonHalt:
            return


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
