"""hook_dispatch.py: mitmproxy's hook dispatch, skipping the addons without
the hook, must do what mitmproxy's own does (order, sub-addons, errors,
AddonHalt, add_log) on a real AddonManager; the mirror's speed with it is
measured by bench.py's resolutions phase."""

import asyncio
import itertools
import logging

import pytest
from mitmproxy import addonmanager, exceptions, log as mitmlog
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

from addon import hook_dispatch


class Plain:
    """An addon with no flow hook, as most of mitmdump's are."""

    count = itertools.count()

    def __init__(self):
        self.name = f"plain-{next(self.count)}"  # mitmproxy wants one name per addon


class Recorder:
    def __init__(self, calls, name, fail=None, is_async=False):
        self.calls, self.name, self.fail, self.is_async = calls, name, fail, is_async
        if is_async:
            self.request = self._async_request

    def request(self, flow):
        self.calls.append(self.name)
        if self.fail:
            raise self.fail

    async def _async_request(self, flow):
        await asyncio.sleep(0)
        self.calls.append(self.name)


class Parent:
    """No hook itself; its sub-addons have one, and it adds one while the event runs."""

    def __init__(self, calls):
        self.calls = calls
        self.addons = [Plain(), Recorder(calls, "child", is_async=True), Grower(calls, self)]


class Grower:
    def __init__(self, calls, parent):
        self.calls, self.parent = calls, parent

    def request(self, flow):
        self.calls.append("grower")
        if len(self.parent.addons) == 3:
            self.parent.addons.append(Recorder(self.calls, "added during the event"))


def run_chain(tctx, dispatch, halt: bool):
    calls: list[str] = []
    manager = addonmanager.AddonManager(tctx.master)  # a chain of its own on the context's master
    manager.add(Plain(), Recorder(calls, "first"), Plain(), Parent(calls),
                Recorder(calls, "fails", fail=ValueError("boom")), Recorder(calls, "after the failure"))
    if halt:
        manager.add(Recorder(calls, "halts", fail=exceptions.AddonHalt()), Recorder(calls, "never"))
    tctx.master.event_loop.run_until_complete(dispatch(manager, HttpRequestHook(tflow.tflow())))
    return calls


@pytest.mark.parametrize("halt", [False, True])
def test_the_hooks_run_as_mitmproxys_own_dispatch_runs_them(halt, caplog):
    with taddons.context() as tctx, caplog.at_level(logging.ERROR):
        theirs = run_chain(tctx, hook_dispatch.MITMPROXY_TRIGGER_EVENT, halt)
        their_errors = [r.getMessage() for r in caplog.records]
        caplog.clear()
        ours = run_chain(tctx, hook_dispatch.trigger_event, halt)
        our_errors = [r.getMessage() for r in caplog.records]
    assert ours == theirs
    assert ours[:6] == ["first", "child", "grower", "added during the event", "fails", "after the failure"]
    if halt:
        assert ours[-1] == "halts"  # and nothing after it
    else:
        assert "halts" not in ours
    assert our_errors == their_errors == ["Addon error: boom"]


def test_an_addon_without_the_hook_is_not_walked_into(monkeypatch):
    """What it is for: mitmproxy enters each of its addons for every hook of every flow."""
    entered = []
    with taddons.context() as tctx:
        manager = tctx.master.addons
        manager.add(*[Plain() for _ in range(30)], Recorder([], "one"))
        real_invoke = manager.invoke_addon

        async def invoke_addon(addon, event):
            entered.append(addon)
            await real_invoke(addon, event)

        monkeypatch.setattr(manager, "invoke_addon", invoke_addon)
        flow = tflow.tflow()
        tctx.master.event_loop.run_until_complete(hook_dispatch.trigger_event(manager, HttpRequestHook(flow)))
        assert [type(a).__name__ for a in entered] == ["Recorder"]
        entered.clear()
        tctx.master.event_loop.run_until_complete(hook_dispatch.MITMPROXY_TRIGGER_EVENT(manager, HttpRequestHook(flow)))
        assert len(entered) == len(manager.chain) > 30


def test_the_synchronous_trigger_reaches_add_log_hooks_and_refuses_async_ones(caplog):
    class LogReader:
        def __init__(self):
            self.entries = []

        def add_log(self, entry):
            self.entries.append(entry.msg)

    class AsyncLogReader:
        async def add_log(self, entry):
            pass

    reader = LogReader()
    with taddons.context() as tctx, caplog.at_level(logging.ERROR):
        tctx.master.addons.add(Plain(), AsyncLogReader(), reader)
        hook_dispatch.trigger(tctx.master.addons, mitmlog.AddLogHook(mitmlog.LogEntry("hello", "info")))
    assert reader.entries == ["hello"]
    assert any("cannot be called from sync context" in r.getMessage() for r in caplog.records)


def test_it_installs_over_the_code_it_knows_and_leaves_any_other_alone(monkeypatch):
    """A mitmproxy whose dispatch changed (a newer release than the one
    measured) is left alone: slower, never different."""
    monkeypatch.setattr(addonmanager.AddonManager, "trigger_event", hook_dispatch.MITMPROXY_TRIGGER_EVENT)
    monkeypatch.setattr(addonmanager.AddonManager, "trigger", hook_dispatch.MITMPROXY_TRIGGER)
    monkeypatch.setattr(hook_dispatch, "KNOWN_SOURCE", "0" * 64)
    assert hook_dispatch.install() is False
    assert addonmanager.AddonManager.trigger_event is hook_dispatch.MITMPROXY_TRIGGER_EVENT
    assert addonmanager.AddonManager.trigger is hook_dispatch.MITMPROXY_TRIGGER
    monkeypatch.setattr(hook_dispatch, "KNOWN_SOURCE", hook_dispatch.source_hash())
    assert hook_dispatch.install() is True
    assert addonmanager.AddonManager.trigger_event is hook_dispatch.trigger_event
    assert addonmanager.AddonManager.trigger is hook_dispatch.trigger


def test_the_installed_mitmproxy_is_the_one_measured():
    """The venv's mitmproxy is the release hook_dispatch was checked against
    (requirements.txt pins it); a new release needs the differential tests
    above run against it and KNOWN_SOURCE renewed."""
    assert hook_dispatch.source_hash() == hook_dispatch.KNOWN_SOURCE
