"""The steps of `credbroker run` that need no real process, OpenBao or keyring: options, the rotation
strategy, command resolution, the child's environment, the teardown order. The process tests
(test_cli_run.py, test_rotation.py, test_process_tree.py, ...) run the whole pipeline for real."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from broker.config import Profile
from broker.errors import BrokerError, CommandNotFound, RunError
from broker.rotation import Handover, RotationPolicy
from broker.run import pipeline
from broker.run.options import DEFAULT_GRACE, RestartPolicy, RunOptions
from broker.run.pipeline import Handling, Run
from broker.secret import Credentials, Origin, Secret

SPOT = Profile(name="spot", source="vault", env={"SPOT_KEY": "api_key", "SPOT_SECRET": "api_secret"},
               options={"path": "secret/spot"})
UM = Profile(name="um", source="vault", env={"UM_KEY": "api_key", "UM_SECRET": "api_secret"},
             options={"path": "secret/um"})

Records = list[tuple[str, dict[str, Any]]]


def creds(profile: Profile, version: int = 1, secret: str = "SECRET") -> Credentials:
    return Credentials(profile=profile.name, origin=Origin(source="vault", path=f"secret/{profile.name}",
                                                            version=version),
                       fields={"api_key": Secret("AK"), "api_secret": Secret(f"{secret}-{version}")})


def recorder() -> tuple[Records, Callable[[str, dict[str, Any]], None]]:
    records: Records = []
    return records, lambda event, fields: records.append((event, fields))


# -- options ---------------------------------------------------------------------------------------------------


def test_options_from_one_profile_are_the_same_value_as_from_a_list_of_one() -> None:
    policy = RotationPolicy("restart", None, 30.0, 4.0)
    one = RunOptions.build(SPOT, ["python", "bot.py"], rotation=policy)
    listed = RunOptions.build([SPOT], ("python", "bot.py"), rotation=[policy])
    assert one == listed
    assert one.profiles == (SPOT,) and one.command == ("python", "bot.py") and one.rotation == (policy,)
    assert not one.many and one.watched == [policy]


def test_options_are_frozen() -> None:
    options = RunOptions.build(SPOT, ["true"])
    with pytest.raises(AttributeError):
        options.agent = True  # type: ignore[misc]
    assert options._replace(agent=True).agent and not options.agent  # a changed copy, never in place


def test_grace_defaults_to_the_longest_rotation_grace_else_ten_seconds() -> None:
    assert RunOptions.build(SPOT, ["true"]).grace == DEFAULT_GRACE == 10.0
    policies: list[RotationPolicy | None] = [RotationPolicy("restart", None, 60.0, 3.0), None]
    assert RunOptions.build([SPOT, UM], ["true"], rotation=policies).grace == 3.0
    assert RunOptions.build([SPOT, UM], ["true"], rotation=policies, grace=7.5).grace == 7.5


def test_restart_policy_is_an_enum_built_from_its_name() -> None:
    options = RunOptions.build(SPOT, ["true"], restart="on-failure")
    assert options.restart is RestartPolicy.ON_FAILURE
    with pytest.raises(RunError, match="unknown restart policy 'always'"):
        RunOptions.build(SPOT, ["true"], restart="always")


@pytest.mark.parametrize("kwargs, message", [
    ({"profile": []}, "no profile given"),
    ({"profile": [SPOT, UM], "proxy": True}, "--proxy serves one profile per run, and this run names 2"),
    ({"profile": [SPOT, UM], "rotation": [None]}, "one rotation policy per profile"),
    ({"profile": SPOT, "agent": True, "mask": True}, "--mask and --agent cannot be combined"),
])
def test_options_that_cannot_run_are_refused_in_one_line(kwargs: dict[str, Any], message: str) -> None:
    profile = kwargs.pop("profile")
    with pytest.raises(RunError) as err:
        RunOptions.build(profile, ["true"], **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 125


# -- command resolution ------------------------------------------------------------------------------------------


def test_a_command_not_found_is_refused_and_recorded_before_any_fetch(tmp_path: Path) -> None:
    records, rec = recorder()
    run = Run(RunOptions.build(SPOT, ["no-such-bot"], environ={"PATH": str(tmp_path)}, record=rec))
    with pytest.raises(CommandNotFound):
        run.resolve_command()
    assert [e for e, _ in records] == ["refused"]
    assert records[0][1]["profile"] == "spot" and records[0][1]["command"]
    assert run.held == []  # nothing fetched


def test_a_variable_two_profiles_set_is_refused_for_each_profile(tmp_path: Path) -> None:
    records, rec = recorder()
    clash = UM._replace(env={"SPOT_SECRET": "api_secret"})
    run = Run(RunOptions.build([SPOT, clash], ["true"], environ={"PATH": os.defpath}, record=rec))
    with pytest.raises(RunError, match="both set SPOT_SECRET"):
        run.resolve_command()
    assert [(e, f["profile"]) for e, f in records] == [("refused", "spot"), ("refused", "um")]


def test_the_command_is_resolved_on_the_childs_path(tmp_path: Path) -> None:
    exe = tmp_path / "bot"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    run = Run(RunOptions.build(SPOT, ["bot", "--live"], environ={"PATH": str(tmp_path)}, record=recorder()[1]))
    run.resolve_command()
    assert run.executable == str(exe) and run.as_user is None and run.box is None


# -- the child's environment --------------------------------------------------------------------------------------


def test_the_childs_parent_environment_drops_systemds_and_proxy_config_variables() -> None:
    environ = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000", "CREDBROKER_CONFIG": "/c.toml"}
    run = Run(RunOptions.build(SPOT, ["true"], environ=environ, record=recorder()[1], proxy=True))
    parent = run._child_parent()
    assert parent == {"PATH": "/bin"}
    assert run.notifier is not None  # under systemd: READY/STOPPING are the broker's
    plain = Run(RunOptions.build(SPOT, ["true"], environ={"PATH": "/bin", "CREDBROKER_CONFIG": "/c.toml"},
                                 record=recorder()[1]))
    assert plain._child_parent() == {"PATH": "/bin", "CREDBROKER_CONFIG": "/c.toml"} and plain.notifier is None


def test_child_env_step_keeps_the_secret_only_when_the_broker_may_need_it_again() -> None:
    for restart, keep in (("no", False), ("on-failure", True)):
        run = Run(RunOptions.build(SPOT, ["true"], environ={"PATH": "/bin"}, record=recorder()[1],
                                   restart=restart))
        run.held = [creds(SPOT)]
        with ExitStack() as stack:
            run.prepare_child_env(stack)
        assert run.keep is keep
        assert run.extra == run.per_profile[0] and "CREDBROKER_CONFIG" not in run.extra
        assert not any("SECRET-1" in v for v in run.extra.values())  # the bot's key kind, never the key


# -- the rotation strategy -----------------------------------------------------------------------------------------


class FakeWorker:
    def __init__(self, batch: list[tuple[int, Handover]] | None) -> None:
        self.batch = batch
        self.done_calls = 0

    def take(self) -> list[tuple[int, Handover]] | None:
        batch, self.batch = self.batch, None
        return batch

    def done(self) -> None:
        self.done_calls += 1


class FakeWatcher:
    def __init__(self, version: int) -> None:
        self.version = version
        self.acted_on: list[int] = []

    def acted(self, version: int) -> None:
        self.acted_on.append(version)


class FakeChild:
    pid = 4242


def rotating_run(policies: list[RotationPolicy], batch: list[tuple[int, Handover]],
                 monkeypatch: pytest.MonkeyPatch) -> tuple[Run, Records, list[tuple[int, int]], FakeWorker]:
    records, rec = recorder()
    profiles = [SPOT, UM][:len(policies)]
    run = Run(RunOptions.build(profiles, ["true"], environ={}, record=rec, rotation=list(policies)))
    run.held = [creds(p) for p in profiles]
    run.watchers = [FakeWatcher(1) for _ in profiles]
    worker = FakeWorker(batch)
    run.worker = worker
    run.child = FakeChild()  # type: ignore[assignment]
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: killed.append((pid, signum)))
    monkeypatch.setattr(pipeline, "say", lambda message: None)
    return run, records, killed, worker


def test_a_restart_rotation_is_held_for_one_restart_and_never_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    new = creds(SPOT, 2)
    run, records, killed, worker = rotating_run([RotationPolicy("restart")], [(0, Handover("restart", 1, 2, new))],
                                                monkeypatch)
    assert run.on_wake() is True  # the supervisor restarts the bot
    assert run.pending == {0: new} and killed == [] and worker.done_calls == 0
    assert run.watchers[0].acted_on == [2] and run.watchers[0].version == 1  # moved on once the new bot runs
    assert [(e, f["action"], f["new_version"]) for e, f in records] == [("rotation_detected", "restart", 2)]


def test_one_signal_of_a_kind_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    hup = RotationPolicy("signal", int(signal.SIGHUP))
    batch = [(0, Handover("signal", 1, 2)), (1, Handover("signal", 1, 5))]
    run, records, killed, worker = rotating_run([hup, hup], batch, monkeypatch)
    assert run.on_wake() is False
    assert killed == [(4242, signal.SIGHUP)] and worker.done_calls == 1
    assert [w.version for w in run.watchers] == [2, 5]
    assert [f["profile"] for _, f in records] == ["spot", "um"]


def test_an_ignored_rotation_is_recorded_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    run, records, killed, worker = rotating_run([RotationPolicy("ignore")], [(0, Handover("ignore", 1, 2))],
                                                monkeypatch)
    assert run.on_wake() is False
    assert killed == [] and worker.done_calls == 1 and run.pending == {}
    assert run.watchers[0].version == 1 and run.watchers[0].acted_on == [2]
    assert [(e, f["action"]) for e, f in records] == [("rotation_detected", "ignore")]


def test_a_swap_gives_the_agent_the_new_key_and_wipes_the_old(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[Credentials] = []

    class Signing:
        def use(self, c: Credentials) -> None:
            used.append(c)

    hup = RotationPolicy("signal", int(signal.SIGHUP))
    new = creds(SPOT, 2)
    run, records, killed, worker = rotating_run([hup], [(0, Handover("swap", 1, 2, new))], monkeypatch)
    old = run.held[0]
    run.signings = [Signing()]
    assert run.on_wake() is False
    assert used == [new] and run.held[0] is new and old["api_secret"].wiped
    assert run.creds is not None and run.creds["api_secret"].reveal() == b"SECRET-2"
    assert killed == [(4242, signal.SIGHUP)] and run.watchers[0].version == 2
    assert [f["action"] for _, f in records] == ["agent_key_swapped"]


def test_nothing_handed_over_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    run, records, killed, worker = rotating_run([RotationPolicy("restart")], [], monkeypatch)
    worker.batch = None
    assert run.on_wake() is False and records == [] and killed == [] and worker.done_calls == 0


def test_every_handover_kind_has_a_handling() -> None:
    assert {h.value for h in Handling} == {"restart", "swap", "signal", "ignore"}
    with pytest.raises(ValueError):
        Handling("reload")


# -- teardown --------------------------------------------------------------------------------------------------


def test_teardown_runs_in_reverse_order_of_taking_when_the_start_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bot cannot be started: the run's resources are still released, each after what depends on it."""
    events: list[str] = []
    records, rec = recorder()
    held = [creds(SPOT)]

    class Relay:
        child_fds = ()
        child_pid = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            events.append("relay started")

        def child_env(self) -> dict[str, str]:
            return {}

        def close(self) -> None:
            events.append("relay closed")

    def start_watchdog(self: Run, stack: ExitStack) -> None:
        events.append("watchdog started")
        stack.callback(events.append, "watchdog closed")
        stack.callback(self._stop_child)

    def launch(*args: Any, **kwargs: Any) -> Any:
        raise RunError("cannot start true: test", "none")

    def wipe() -> None:
        events.append("wiped")
        for c in held:
            c.wipe()

    monkeypatch.setattr("broker.hardening.harden_process", lambda: None)
    monkeypatch.setattr("broker.relay.AuditRelay", Relay)
    monkeypatch.setattr(pipeline, "fetch_all", lambda *args, **kwargs: held)
    monkeypatch.setattr(Run, "_start_watchdog", start_watchdog)
    monkeypatch.setattr(pipeline, "launch", launch)
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    run = Run(RunOptions.build(SPOT, ["true"], environ={"PATH": os.defpath}, record=rec))
    monkeypatch.setattr(run, "_wipe", wipe)
    with pytest.raises(RunError, match="cannot start true"):
        run.execute()
    assert events == ["relay started", "watchdog started", "watchdog closed", "relay closed", "wiped"]
    assert held[0]["api_secret"].wiped
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before  # the signals are ours again
    assert run.child is None


def test_a_refused_fetch_starts_nothing_and_leaves_the_signal_mask_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []

    def fetch_all(*args: Any, **kwargs: Any) -> list[Credentials]:
        raise BrokerError("cannot read secret/spot", "check the path")

    monkeypatch.setattr("broker.hardening.harden_process", lambda: None)
    monkeypatch.setattr(pipeline, "fetch_all", fetch_all)
    monkeypatch.setattr(Run, "prepare_child_env", lambda self, stack: started.append("child env"))
    monkeypatch.setattr(Run, "start_services", lambda self, stack: started.append("services"))
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    run = Run(RunOptions.build(SPOT, ["true"], environ={"PATH": os.defpath}, record=recorder()[1]))
    with pytest.raises(BrokerError, match="cannot read"):
        run.execute()
    assert run.executable.endswith("/true")  # the steps before the fetch ran
    assert started == [] and run.child is None and run.held == [] and run.creds is None
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before
