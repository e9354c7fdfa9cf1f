"""Keeping the broker's own credentials away from the bot: another user, or a sandbox.

In agent mode the bot never holds the exchange secret, but the broker's Vault
credential may sit on disk: ``~/.vault-token``, the AppRole ``role_id_file``
and ``secret_id_file``, an audit key file (``[audit] key = "file:..."``), and
the OS keyring (reachable over D-Bus by any process of the same user). A bot
of the same user could read those and fetch the secret itself. Two ways to
separate them:

* ``--user NAME`` (``--group NAME``): the bot runs as another user. The
  broker must be able to switch users (root, or CAP_SETUID and CAP_SETGID).
  Every credential file must be unreadable by that user, which is checked by
  asking the kernel as that user (``test -r`` run with the bot's ids), so
  ACLs count too.
* ``--sandbox``: the bot runs under bubblewrap (``bwrap``) with every
  credential file present at start replaced by an empty one. It cannot hide
  the keyring (D-Bus), so a keyring source still needs ``--user``.

Without either, ``credbroker run --agent`` refuses to start when a credential
is within the bot's reach, unless ``--unsafe-shared-credentials`` accepts it
(warned at every start).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ConfigError, RunError
from .vault.origins import value

_CAP_SETGID = 6
_CAP_SETUID = 7
UNSAFE_FLAG = "--unsafe-shared-credentials"


class UserSwitch(NamedTuple):
    """The user (and groups) the bot runs as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def popen_args(self) -> dict[str, Any]:
        """For ``subprocess.Popen`` of a helper that runs as this user."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def switch(self) -> None:
        """In the child between fork and exec: become that user (groups first, then gid, then uid)."""
        os.setgroups([self.gid, *self.groups])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)

    def environment(self) -> dict[str, str]:
        """What a login as that user would set (as ``runuser``/``sudo -u`` do)."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def can_switch_users() -> bool:
    """True for root, or a process holding both CAP_SETUID and CAP_SETGID."""
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return bool(caps >> _CAP_SETUID & 1 and caps >> _CAP_SETGID & 1)
    except (OSError, ValueError):
        pass
    return False


def resolve_user(user: str | None, group: str | None) -> UserSwitch | None:
    """``--user``/``--group`` as a UserSwitch, or None when neither is given (ConfigError/RunError: one line)."""
    if user is None and group is None:
        return None
    if user is None:
        raise ConfigError("--group needs --user", "name the user the bot runs as: --user NAME [--group NAME]")
    import grp
    import pwd

    try:
        entry = pwd.getpwuid(int(user)) if user.isascii() and user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError, OverflowError):  # ValueError: a NUL in the name; OverflowError: no uid
        raise ConfigError(f"--user {user}: no such user", "create the user, or check the name (getent passwd)"
                          ) from None
    if entry.pw_uid == 0 or entry.pw_uid == os.geteuid():
        raise ConfigError(f"--user {user}: the bot must run as another user than credbroker's and not as root",
                          "create a dedicated user for the bot, e.g. `useradd --system tradebot`")
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isascii() and group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, ValueError, OverflowError):
            raise ConfigError(f"--group {group}: no such group", "check the name (getent group)") from None
    if not can_switch_users():
        raise RunError(f"--user {user}: credbroker cannot switch users (it is neither root nor holds CAP_SETUID "
                       "and CAP_SETGID)", "start credbroker as root (e.g. a system service), or use --sandbox")
    groups = tuple(g for g in os.getgrouplist(entry.pw_name, gid) if g != gid)
    return UserSwitch(entry.pw_name, entry.pw_uid, gid, groups, entry.pw_dir or "/")


# -- what the bot must not reach ----------------------------------------------------------------


class Credential(NamedTuple):
    """One place the broker's own credential lives: a file, or the keyring."""

    what: str
    path: Path | None  # None: the OS keyring (D-Bus), not a file


def broker_credentials(env: Mapping[str, str], profile_source: str, audit_key_spec: str | None
                       ) -> list[Credential]:
    """Every credential of the broker's a bot could use, as they stand at start."""
    found: list[Credential] = []
    home = env.get("HOME") or os.path.expanduser("~")
    token = Path(home) / ".vault-token"
    if token.is_file():
        found.append(Credential("the Vault token file", token))
    for var, what in (("CREDBROKER_ROLE_ID_FILE", "the AppRole role_id_file"),
                      ("CREDBROKER_SECRET_ID_FILE", "the AppRole secret_id_file"),
                      ("VAULT_CLIENT_KEY", "the TLS client key"), ("BAO_CLIENT_KEY", "the TLS client key")):
        named = value(env, var)  # the environment, else [vault] role_id_file ...
        if named:
            path = Path(os.path.abspath(Path(named).expanduser()))
            if path.is_file():
                found.append(Credential(what, path))
    spec = audit_key_spec or ""
    if spec.startswith("file:"):
        path = Path(os.path.abspath(Path(spec[5:]).expanduser()))
        if path.is_file():
            found.append(Credential("the audit key file", path))
    if profile_source == "keyring" or spec.startswith("keyring:"):
        found.append(Credential("the OS keyring (the bot could ask it over D-Bus)", None))
    return found


def readable_by(user: UserSwitch, paths: Sequence[Path]) -> list[Path]:
    """The paths ``user`` can read, asked of the kernel as that user (ACLs and folders count)."""
    if not paths:
        return []
    script = 'for f; do test -r "$f" && printf "%s\\0" "$f"; done; exit 0'
    try:
        res = subprocess.run(["/bin/sh", "-c", script, "sh", *map(str, paths)], capture_output=True,  # noqa: S603
                             timeout=30, env={"PATH": os.defpath}, cwd="/", **user.popen_args())
    except (OSError, subprocess.SubprocessError) as exc:
        raise RunError(f"cannot check what --user {user.name} can read: {exc}",
                       "check that /bin/sh exists and the user is valid") from exc
    readable = {p for p in res.stdout.split(b"\0") if p}
    return [p for p in paths if os.fsencode(str(p)) in readable]


def check_separation(creds: Sequence[Credential], *, user: UserSwitch | None, sandbox: bool, agent: bool,
                     unsafe: bool) -> str | None:
    """Raise RunError (125) when the bot could reach a broker credential; a warning line when accepted as unsafe.

    Only agent mode refuses: without it the bot holds the exchange secret anyway.
    """
    reachable: list[Credential]
    how: str
    if user is not None:
        files = [c.path for c in creds if c.path is not None]
        open_to_bot = set(readable_by(user, files))
        reachable = [c for c in creds if c.path in open_to_bot]
        how = f"the bot's user {user.name}"
        remedy = "make it readable by credbroker's user only: chmod 600 FILE (and chmod go-rx its folder)"
    elif sandbox:
        reachable = [c for c in creds if c.path is None]
        how = "the sandboxed bot"
        remedy = "run the bot as another user (--user NAME) to keep it from the keyring"
    else:
        reachable = list(creds)
        how = "the bot (the same user as credbroker)"
        remedy = ("run the bot as another user (--user NAME, credbroker as root) or in a sandbox (--sandbox, "
                  f"needs bubblewrap), or accept the risk with {UNSAFE_FLAG}")
    if not reachable or not agent:
        return None
    first = reachable[0]
    named = first.what + (f" {first.path}" if first.path is not None else "")
    more = f" (and {len(reachable) - 1} more)" if len(reachable) > 1 else ""
    message = (f"--agent/--proxy: {how} could read {named}{more}, the broker's own credential, and fetch the "
               "secret itself")
    if unsafe:
        return f"WARNING: {message}; started anyway because of {UNSAFE_FLAG}"
    raise RunError(message, remedy)


# -- the sandbox --------------------------------------------------------------------------------


def bwrap_binary() -> str:
    """bubblewrap's path, or RunError (125) saying how to install it."""
    found = shutil.which("bwrap")
    if found is None:
        raise RunError("--sandbox needs bubblewrap (bwrap), which is not installed",
                       "install it (Debian/Ubuntu: apt-get install bubblewrap), or use --user NAME")
    return found


class Sandbox(NamedTuple):
    """bubblewrap around the bot: the whole file system as it is, the credential files emptied."""

    bwrap: str
    hidden: tuple[Path, ...]

    def argv(self, executable: str, argv: Sequence[str], info_fd: int) -> list[str]:
        """The command line that runs ``argv`` (resolved to ``executable``) inside the sandbox."""
        hide: list[str] = []
        for path in self.hidden:
            hide += ["--ro-bind", "/dev/null", str(path)]
        # --die-with-parent: the bot gets SIGKILL if bwrap dies; --info-fd tells us the bot's pid,
        # because bwrap does not pass signals on: the broker signals the bot itself.
        return [self.bwrap, "--dev-bind", "/", "/", *hide, "--die-with-parent", "--info-fd", str(info_fd),
                "--", executable, *argv[1:]]


def read_bot_pid(fd: int, timeout: float = 10.0) -> int | None:
    """The bot's pid from bwrap's ``--info-fd`` (None if bwrap failed first). Closes ``fd``."""
    data = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    try:
        pid = json.loads(data).get("child-pid")
    except (ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 1 else None
