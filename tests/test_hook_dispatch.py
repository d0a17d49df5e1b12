"""hook_dispatch.py: mitmproxy's hook dispatch, visiting only the addons
with the hook, must do what mitmproxy's own does (order, sub-addons, errors
and their tracebacks, AddonHalt, add_log) on a real AddonManager, also after
the chain changes, an addon sets itself up, or a script is reloaded; the
mirror's speed with it is measured by bench.py's resolutions phase."""

import asyncio
import itertools
import logging
import traceback

import pytest
from mitmproxy import addonmanager, exceptions, hooks, log as mitmlog
from mitmproxy.addons import script
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
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
            raise type(self.fail)(*self.fail.args)  # a new one each time: a traceback of its own

    async def _async_request(self, flow):
        await asyncio.sleep(0)
        self.calls.append(self.name)
        if self.fail:
            raise type(self.fail)(*self.fail.args)  # a new one each time: a traceback of its own


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


def run_chain(tctx, dispatch, halt: bool, events: int = 1):
    calls: list[str] = []
    manager = addonmanager.AddonManager(tctx.master)  # a chain of its own on the context's master
    manager.add(Plain(), Recorder(calls, "first"), Plain(), Parent(calls),
                Recorder(calls, "fails", fail=ValueError("boom")), Recorder(calls, "after the failure"),
                Recorder(calls, "fails async", fail=KeyError("async boom"), is_async=True))
    if halt:
        manager.add(Recorder(calls, "halts", fail=exceptions.AddonHalt()), Recorder(calls, "never"))
    for _ in range(events):
        tctx.master.event_loop.run_until_complete(dispatch(manager, HttpRequestHook(tflow.tflow())))
    return calls


def errors_of(records) -> list[tuple[str, str]]:
    """Each error's message and its traceback as printed."""
    return [(r.getMessage(), "".join(traceback.format_exception(*r.exc_info))) for r in records]


@pytest.mark.parametrize("halt", [False, True])
def test_the_hooks_run_as_mitmproxys_own_dispatch_runs_them(halt, caplog):
    with taddons.context() as tctx, caplog.at_level(logging.ERROR):
        theirs = run_chain(tctx, hook_dispatch.MITMPROXY_TRIGGER_EVENT, halt, events=2)
        their_errors = errors_of(caplog.records)
        caplog.clear()
        ours = run_chain(tctx, hook_dispatch.trigger_event, halt, events=2)  # the second from what the first found
        our_errors = errors_of(caplog.records)
    assert ours == theirs
    first_event = ours[:len(ours) // 2]
    assert first_event[:7] == ["first", "child", "grower", "added during the event", "fails", "after the failure",
                               "fails async"]
    if halt:
        assert first_event[-1] == "halts"  # and nothing after it
    else:
        assert "halts" not in ours
    assert our_errors == their_errors
    assert [message for message, _ in our_errors] == ["Addon error: boom", "Addon error: 'async boom'"] * 2
    assert "addon/hook_dispatch.py" not in our_errors[0][1] and "_request" in our_errors[1][1]  # from the hook down


class Spy:
    """An addon without hooks that counts the names it is asked for."""

    def __init__(self, asked):
        self.asked = asked
        self.name = f"spy-{next(Plain.count)}"

    def __getattr__(self, name):
        self.asked.append(name)
        raise AttributeError(name)


@pytest.mark.parametrize("sync", [False, True])
def test_an_addon_without_the_hook_is_not_looked_at_again(sync):
    """What it is for: mitmproxy enters each of its addons for every hook of every flow."""
    asked: list[str] = []
    calls: list[str] = []

    class LogReader:
        def add_log(self, entry):
            calls.append(entry.msg)

    with taddons.context() as tctx:
        manager = addonmanager.AddonManager(tctx.master)
        manager.add(*[Spy(asked) for _ in range(30)], Recorder(calls, "one"), LogReader())

        def dispatch(dispatcher):
            if sync:
                dispatcher[1](manager, mitmlog.AddLogHook(mitmlog.LogEntry("one", "info")))
            else:
                tctx.master.event_loop.run_until_complete(dispatcher[0](manager, HttpRequestHook(tflow.tflow())))

        ours = (hook_dispatch.trigger_event, hook_dispatch.trigger)
        theirs = (hook_dispatch.MITMPROXY_TRIGGER_EVENT, hook_dispatch.MITMPROXY_TRIGGER)
        dispatch(ours)
        assert len(asked) >= 30  # the first event finds which have the hook
        asked.clear()
        dispatch(ours)
        dispatch(ours)
        assert asked == []
        assert calls == ["one"] * 3
        dispatch(theirs)
        assert len(asked) >= 30


def request_event(tctx, manager, dispatch=hook_dispatch.trigger_event):
    tctx.master.event_loop.run_until_complete(dispatch(manager, HttpRequestHook(tflow.tflow())))


def test_addons_added_and_removed_are_seen_at_the_next_event():
    calls: list[str] = []
    with taddons.context() as tctx:
        manager = addonmanager.AddonManager(tctx.master)
        old = Recorder(calls, "old")
        manager.add(Plain(), old)
        request_event(tctx, manager)
        manager.add(Recorder(calls, "new"))
        request_event(tctx, manager)
        manager.remove(old)
        manager.add(Recorder(calls, "newer"))  # as long a chain as the one before, another list
        request_event(tctx, manager)
        manager.remove(manager.chain[-1])
        request_event(tctx, manager)
    assert calls == ["old", "old", "new", "new", "newer", "new"]


@pytest.mark.parametrize("sync", [False, True])
def test_an_addon_added_to_the_chain_during_an_event_gets_it_as_in_mitmproxy(sync):
    def run(dispatch) -> list[str]:
        calls: list[str] = []

        class Adder:
            def update(self, flows):
                calls.append("adder")
                if len(manager.chain) == 2:
                    manager.add(Updated(), Plain())

        class Updated:
            def update(self, flows):
                calls.append("added")

        with taddons.context() as tctx:
            manager = addonmanager.AddonManager(tctx.master)
            manager.add(Adder(), Plain())
            for _ in range(2):
                event = hooks.UpdateHook([])
                if sync:
                    dispatch[1](manager, event)
                else:
                    tctx.master.event_loop.run_until_complete(dispatch[0](manager, event))
        return calls

    theirs = run((hook_dispatch.MITMPROXY_TRIGGER_EVENT, hook_dispatch.MITMPROXY_TRIGGER))
    assert run((hook_dispatch.trigger_event, hook_dispatch.trigger)) == theirs == ["adder", "added"] * 2


@pytest.mark.parametrize("sync", [False, True])
def test_an_addon_that_gives_itself_a_hook_when_set_up_gets_it(sync):
    calls: list[str] = []

    class SetUp:
        def configure(self, updated):
            self.request = lambda flow: calls.append("request")

        async def running(self):
            self.request = lambda flow: calls.append("request")

    with taddons.context() as tctx:
        manager = addonmanager.AddonManager(tctx.master)
        manager.add(SetUp())
        request_event(tctx, manager)
        if sync:
            hook_dispatch.trigger(manager, hooks.ConfigureHook({"x"}))
        else:
            del SetUp.configure
            tctx.master.event_loop.run_until_complete(hook_dispatch.trigger_event(manager, hooks.RunningHook()))
        request_event(tctx, manager)
    assert calls == ["request"]


def test_a_hook_that_is_no_function_is_refused_and_a_module_skipped_as_in_mitmproxy(caplog):
    def run(tctx, dispatch) -> tuple[list[str], list[str]]:
        calls: list[str] = []
        odd, skipped = Plain(), Plain()
        odd.request, skipped.request = 5, logging  # as after `from x import request` in a script
        caplog.clear()
        manager = addonmanager.AddonManager(tctx.master)
        manager.add(Recorder(calls, "before"), skipped, odd, Recorder(calls, "after"))
        for _ in range(2):
            request_event(tctx, manager, dispatch)
        return calls, [r.getMessage().replace(repr(odd), "odd") for r in caplog.records]

    with taddons.context() as tctx, caplog.at_level(logging.ERROR):
        theirs = run(tctx, hook_dispatch.MITMPROXY_TRIGGER_EVENT)
        assert run(tctx, hook_dispatch.trigger_event) == theirs
    assert theirs == (["before", "after"] * 2, ["Addon error: Addon handler request (odd) not callable"] * 2)


class Raising(Plain):
    """An addon whose hook attribute raises when looked up (a property, say),
    once it is in the chain (mitmproxy's add() looks at every attribute)."""

    broken = False

    @property
    def request(self):
        if self.broken:
            raise KeyError("request")
        return None


def test_an_addon_whose_hook_lookup_raises_is_logged_and_the_others_run_as_in_mitmproxy(caplog):
    def run(tctx, dispatch) -> tuple[list[str], list[str]]:
        calls: list[str] = []
        caplog.clear()
        manager = addonmanager.AddonManager(tctx.master)
        raising = Raising()
        manager.add(Recorder(calls, "before"), raising, Recorder(calls, "after"))
        raising.broken = True
        for _ in range(2):
            request_event(tctx, manager, dispatch)
        return calls, [r.getMessage() for r in caplog.records]

    with taddons.context() as tctx, caplog.at_level(logging.ERROR):
        theirs = run(tctx, hook_dispatch.MITMPROXY_TRIGGER_EVENT)
        assert run(tctx, hook_dispatch.trigger_event) == theirs
    assert theirs == (["before", "after"] * 2, ["Addon error: 'request'"] * 2)


def test_a_reloaded_script_gets_its_new_hooks_and_not_the_removed_ones(tmp_path):
    """mitmproxy's script loader replaces a script's module when its file
    changes (Script.loadscript, which its watcher calls)."""
    path = tmp_path / "a_script.py"
    path.write_text("calls = []\ndef request(flow):\n    calls.append('request v1')\n")
    with taddons.context() as tctx:
        manager = tctx.master.addons
        loader = script.ScriptLoader()
        manager.add(Plain(), loader)
        one = script.Script(str(path), False)  # loaded now (its module registered), not by its watcher
        loader.addons.append(one)  # as ScriptLoader.configure does
        calls = one.ns.calls
        request_event(tctx, manager)
        response = lambda: tctx.master.event_loop.run_until_complete(  # noqa: E731
            hook_dispatch.trigger_event(manager, HttpResponseHook(tflow.tflow(resp=True))))
        response()
        path.write_text("calls = []\ndef response(flow):\n    calls.append('response v2')\n")
        one.loadscript()
        calls2 = one.ns.calls
        request_event(tctx, manager)
        response()
        loader.addons.remove(one)  # unloaded, as ScriptLoader.configure does
        manager.remove(one.ns)
        response()
    assert calls == ["request v1"]
    assert calls2 == ["response v2"]


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
