"""The one value `credbroker run` is built from: the CLI and library callers construct it the same way.

``RunOptions.build`` checks what can be checked before anything happens (no
profile, a rotation policy per profile, ``--proxy`` with several profiles, the
restart policy, ``--mask`` with ``--agent``); the run itself never sees a
half-valid set of options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from ..config import Profile
from ..errors import RunError
from ..events import Recorder as Recorder  # re-exported: run() callers type their recorder with it

if TYPE_CHECKING:
    from ..config import Config
    from ..preflight import PreflightOptions
    from ..rotation import RotationPolicy

#: Called as record(event, fields); broker.audit.AuditLog.record fits.

#: The stop grace (seconds between SIGTERM and SIGKILL) when neither --grace nor a rotation policy names one.
DEFAULT_GRACE = 10.0


class RestartPolicy(StrEnum):
    """What happens when the bot exits by itself (like Docker's restart policies)."""

    NO = "no"
    ON_FAILURE = "on-failure"


#: The restart policies' names, in the order the CLI offers them.
RESTART_POLICIES: tuple[str, ...] = tuple(p.value for p in RestartPolicy)


class RunOptions(NamedTuple):
    """Everything one `credbroker run` needs, validated (build it with ``RunOptions.build``).

    Immutable. A NamedTuple rather than a frozen dataclass: ``dataclasses`` is not otherwise loaded on
    the start path of `credbroker run`, and importing it there cost about 10 ms of CPU per run (measured).

    ``profiles``: all are fetched or none; ``rotation``: one policy (or None:
    not watched) per profile; ``grace``: seconds between SIGTERM and SIGKILL
    whenever the bot's process group is stopped. ``agent``/``proxy`` keep the
    signing key in the broker; ``user``/``group``/``sandbox`` keep the
    broker's own credentials from the bot (``broker.separation``).
    """

    profiles: tuple[Profile, ...]
    command: tuple[str, ...]
    config: Config | None = None
    environ: Mapping[str, str] | None = None
    record: Recorder | None = None
    verbose: bool = False
    rotation: tuple[RotationPolicy | None, ...] = ()
    restart: RestartPolicy = RestartPolicy.NO
    agent: bool = False
    preflight: PreflightOptions | None = None
    mask: bool = False
    grace: float = DEFAULT_GRACE
    user: str | None = None
    group: str | None = None
    sandbox: bool = False
    unsafe_shared_credentials: bool = False
    proxy: bool = False

    @property
    def many(self) -> bool:
        """Several profiles in one run (``-p spot -p um-futures``)."""
        return len(self.profiles) > 1

    @property
    def watched(self) -> list[RotationPolicy]:
        """The rotation policies of the profiles whose rotation is followed."""
        return [p for p in self.rotation if p is not None]

    @classmethod
    def build(
        cls,
        profile: Profile | Sequence[Profile],
        command: Sequence[str],
        *,
        config: Config | None = None,
        environ: Mapping[str, str] | None = None,
        record: Recorder | None = None,
        verbose: bool = False,
        rotation: RotationPolicy | list[RotationPolicy | None] | None = None,
        restart: RestartPolicy | str = RestartPolicy.NO,
        agent: bool = False,
        preflight: PreflightOptions | None = None,
        mask: bool = False,
        grace: float | None = None,
        user: str | None = None,
        group: str | None = None,
        sandbox: bool = False,
        unsafe_shared_credentials: bool = False,
        proxy: bool = False,
    ) -> RunOptions:
        """The options of one run, or the one-line error that refuses them (nothing fetched, nothing started).

        ``profile`` is one profile or several; ``rotation`` one policy for one
        profile, or a list with one policy (or None) per profile. ``grace``
        None: the longest grace of the rotation policies, else 10 s.
        """
        profiles = (profile,) if isinstance(profile, Profile) else tuple(profile)
        if not profiles:
            raise RunError("no profile given", "name one with -p PROFILE")
        # A list: one policy (or None) per profile. (A RotationPolicy is a NamedTuple, hence not "tuple" here.)
        policies: tuple[RotationPolicy | None, ...] = (
            tuple(rotation) if isinstance(rotation, list) else (rotation,) * len(profiles))
        if len(policies) != len(profiles):
            raise RunError("one rotation policy per profile is needed", "this is a credbroker bug; please report it")
        if len(profiles) > 1 and proxy:
            raise RunError(f"--proxy serves one profile per run, and this run names {len(profiles)}",
                           "start one `credbroker run --proxy -p PROFILE` per profile, or use --agent "
                           '(get_signer("PROFILE") signs for each profile of the run)')
        if grace is None:
            grace = max((p.grace for p in policies if p is not None), default=DEFAULT_GRACE)
        if restart not in RESTART_POLICIES:
            raise RunError(f"unknown restart policy {restart!r}", f"use one of: {', '.join(RESTART_POLICIES)}")
        if mask and agent:  # the CLI refuses it too; library callers get the same one line
            from ..masking import check_not_agent

            check_not_agent(mask, agent)
        return cls(profiles=profiles, command=tuple(command), config=config, environ=environ, record=record,
                   verbose=verbose, rotation=policies, restart=RestartPolicy(restart), agent=agent,
                   preflight=preflight, mask=mask, grace=grace, user=user, group=group, sandbox=sandbox,
                   unsafe_shared_credentials=unsafe_shared_credentials, proxy=proxy)
