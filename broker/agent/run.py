"""The agent's part of ``credbroker run``: key preflight, what the child may see, the agent's lifetime."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

from ..errors import BrokerError
from ..events import Recorder
from ..signing_policy import SigningPolicy
from .protocol import SOCKET_VAR
from .server import AGENT_STARTED, AGENT_STOPPED, Agent, AuditSink, RecorderSink



class RunSigning:
    """The broker's signing for one ``credbroker run``: key preflight and, in agent mode, the agent.

    ``broker.runner.run`` calls, in order: ``prepare`` (before any fetch:
    validates the policy and the signer kind), ``check_key`` (after the fetch:
    builds the signer, runs the preflight), ``child_view`` (what the child may
    see), ``start_agent`` (signals already blocked), ``use``/``started`` around
    each spawn, and ``stop`` at the end.
    """

    def __init__(self, profile: Any, *, agent: bool, preflight: Any, settings: Any, policy: SigningPolicy | None
                 ) -> None:
        self.profile = profile
        self.agent = agent
        self.preflight = preflight
        self.settings = settings
        self.policy = policy
        self.signer: Any = None
        self._creds: Any = None
        self._audit_config: Any = None
        self.server: Agent | None = None
        self._record: Recorder | None = None

    @classmethod
    def prepare(cls, profile: Any, *, agent: bool, preflight: Any, env: Mapping[str, str], proxy: bool = False
                ) -> RunSigning:
        """Validate what can be validated before any secret is fetched (ConfigError: one line).

        ``proxy``: a ``--proxy`` run; the preflight is ``auto`` unless told
        otherwise and asks the proxy's spot upstream (``PreflightOptions.for_proxy``).
        """
        from ..errors import ConfigError
        from ..signing.settings import SignerSettings

        settings = SignerSettings.for_profile(profile)
        policy = None
        if proxy:
            from ..preflight import PreflightOptions
            from ..proxy.settings import ProxySettings

            if preflight is None:
                preflight = PreflightOptions.build(mode="auto", env=env)
            given = preflight
            if preflight.mode == "auto" and settings.type == "transit":
                preflight = None  # the check signs with a local key; a transit key never leaves Vault
            elif preflight.mode != "off":
                preflight = preflight.for_proxy(ProxySettings.for_profile(profile))
            if preflight is None:
                import sys

                for flag in given.overrides:  # an unsafe switch must never pass unnoticed
                    print(f"credbroker: WARNING: {flag} is given but the key preflight does not run for this "
                          "profile (a transit key or a testnet upstream), so it has no effect",
                          file=sys.stderr, flush=True)
        if agent:
            if settings.type == "transit":
                raise ConfigError(f"{profile.where('signer')}: --agent does not apply to a transit signer",
                                  "run without --agent: with transit the key already stays inside Vault")
            policy = SigningPolicy.for_profile(profile)
            if preflight is None:
                from ..preflight import PreflightOptions

                preflight = PreflightOptions.build(mode="auto", env=env)
        elif preflight is not None and preflight.mode != "off" and settings.type == "transit":
            raise ConfigError(f"{profile.where('signer')}: the key preflight needs a local key, not transit",
                              "run without --preflight")
        return cls(profile, agent=agent, preflight=preflight, settings=settings, policy=policy)

    def _make_signer(self, creds: Any) -> Any:
        from ..signing import make_signer

        return make_signer(self.settings, dict(creds.items()), profile=self.profile.name,
                           where=self.profile.where("signer"), audit_config=self._audit_config,
                           record_failures=False)

    def check_key(self, creds: Any, *, record: Recorder, audit_config: Any = None
                  ) -> None:
        """Build the broker's signer from ``creds`` and run the key preflight (raises to stop the run)."""
        self._audit_config = audit_config
        self._record = record
        if not self.agent and (self.preflight is None or self.preflight.mode == "off"):
            return  # nothing to check, no signer to build (e.g. --proxy with a transit key)
        signer = self._make_signer(creds)
        try:
            if self.preflight is not None and self.preflight.mode != "off":
                from ..preflight import run_preflight

                run_preflight(signer, self.preflight, profile=self.profile.name, record=record)
        except BaseException:
            signer.close()
            raise
        if self.agent:
            self.signer, self._creds = signer, creds
        else:
            signer.close()

    def child_view(self, parent: Mapping[str, str], profile: Any) -> tuple[dict[str, str], Any]:
        """(parent environment, profile) the child's environment is built from: the API key variable only.

        Every variable the profile maps is removed from the parent environment
        first (a stale copy of the secret must not reach the child either).
        """
        keep = {var: field for var, field in profile.env.items() if field == self.settings.api_key_field}
        clean = {k: v for k, v in parent.items() if k not in profile.env and k != SOCKET_VAR}
        return clean, profile._replace(env=keep)

    def start_agent(self, audit_log: Any, record: Recorder,
                    peer_uid: int | None = None) -> dict[str, str]:
        """Start the agent's thread; the variables the child needs (``CREDBROKER_AGENT_SOCKET``).

        ``peer_uid``: the bot runs as that user (``--user``); the socket admits
        it, in a folder under the system's temporary folder (our runtime folder
        is closed to it).
        """
        assert self.policy is not None and self.signer is not None
        sink: AuditSink = audit_log if audit_log is not None else RecorderSink(record)
        runtime = tempfile.gettempdir() if peer_uid is not None and peer_uid != os.getuid() else None
        self.server = Agent(self.signer, profile=self.profile.name, policy=self.policy, audit=sink,
                            runtime_dir=runtime, peer_uid=peer_uid)
        path = self.server.start()
        record(AGENT_STARTED, {"profile": self.profile.name, "socket": str(path), "kind": self.signer.kind,
                               "policy": self.policy.describe()})
        return {SOCKET_VAR: str(path)}

    def use(self, creds: Any) -> None:
        """Before a (re)start: sign with ``creds`` (a rotation brings new ones)."""
        if self.server is None or creds is self._creds:
            return
        self.server.set_signer(self._make_signer(creds))
        self._creds = creds

    def started(self, pid: int) -> None:
        """The bot now running: only its process tree may use the socket."""
        if self.server is not None:
            self.server.set_child(pid)

    def stop(self) -> None:
        """Stop the agent (if any), record its totals, forget the key. Idempotent."""
        server, self.server = self.server, None
        if server is not None:
            server.stop()
            if self._record is not None:
                try:
                    self._record(AGENT_STOPPED, {"profile": self.profile.name, "signed": server.signed,
                                                 "refused": server.refused})
                except BrokerError:
                    pass
        elif self.signer is not None:
            self.signer.close()
        self.signer = None
