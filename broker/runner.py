"""`credbroker run`, kept importable under its old name: the pipeline lives in ``broker.run``."""

from __future__ import annotations

from .errors import RunError
from .run.child import (
    BLOCKED_SIGNALS,
    FORWARDED_SIGNALS,
    JOB_SIGNALS,
    NEST_VAR,
    Child,
    check_not_nested,
    child_environment,
    exit_status,
    launch,
    resolve_command,
    spawn,
    stop_gracefully,
    supervise,
)
from .run.console import say
from .run.options import RESTART_POLICIES, Recorder, RestartPolicy, RunOptions
from .run.pipeline import Run, run
from .config import check_profiles
from .run.profiles import combine, combined_profile

__all__ = ["BLOCKED_SIGNALS", "FORWARDED_SIGNALS", "JOB_SIGNALS", "NEST_VAR", "RESTART_POLICIES", "Child",
           "Recorder", "RestartPolicy", "Run", "RunError", "RunOptions", "check_not_nested", "check_profiles",
           "child_environment", "combine", "combined_profile", "exit_status", "launch", "resolve_command", "run",
           "say", "spawn", "stop_gracefully", "supervise"]
