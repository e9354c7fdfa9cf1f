"""Helpers shared by the policy, script and import tests (not a test module).

* ``start_openbao_with_config``: the conftest dev server plus a config file,
  for the two audit set-ups OpenBao 2.x allows (API creation explicitly
  allowed, or a device declared in the config).
* ``Scripts``: runs scripts/setup-vault, rotate-key and unwrap-secret-id with
  a logging ``bao`` shim first on PATH, so a test can prove that no secret was
  ever an argument of the Vault CLI.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO, OpenBao, service_missing, start_openbao

SCRIPTS = REPO / "scripts"
POLICIES = REPO / "vault-policies"


def start_openbao_with_config(tmp: Path, config_hcl: str) -> OpenBao:
    """A dev server (KV v2 at secret/) that also reads ``config_hcl``."""
    return start_openbao(tmp, config_hcl)


def bot_policy_hcl(bot: str) -> str:
    """The per-bot policy exactly as setup-vault renders it."""
    return (POLICIES / "credbroker-bot.hcl").read_text().replace("__BOT__", bot)


def anchor_policy_hcl(host: str) -> str:
    """The audit-anchor policy exactly as setup-vault --anchor-host renders it."""
    return (POLICIES / "credbroker-audit-anchor.hcl").read_text().replace("__HOST__", host)


@dataclass
class Scripts:
    """Run the admin scripts against ``server`` through a `bao` shim that logs every argv."""

    server: OpenBao
    tmp: Path

    def __post_init__(self) -> None:
        shim_dir = self.tmp / "shim-bin"
        shim_dir.mkdir(exist_ok=True)
        self.argv_log = self.tmp / "cli-argv.log"
        shim = shim_dir / "bao"
        # The shim records each argv (NUL-separated fields, one record per line)
        # and execs the real binary: the same process image the script would run.
        shim.write_text(
            "#!/bin/sh\n"
            f"printf '%s\\0' \"$@\" >> '{self.argv_log}'\n"
            f"printf '\\n' >> '{self.argv_log}'\n"
            f"exec '{self.server.binary}' \"$@\"\n"
        )
        shim.chmod(0o755)
        self.path = f"{shim_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"

    def env(self, token: str | None = None, **extra: str) -> dict[str, str]:
        """A minimal environment: no `vault` on PATH, so the scripts pick `bao`."""
        env = {
            "PATH": self.path,
            "HOME": str(self.tmp / "home"),
            "USER": "tester",
            "TMPDIR": str(self.tmp),
            "VAULT_ADDR": self.server.addr,
            "LANG": "C.UTF-8",
        }
        (self.tmp / "home").mkdir(exist_ok=True)
        if token != "":
            env["VAULT_TOKEN"] = token if token is not None else self.server.token
        env.update(extra)
        return env

    def run(self, script: str, *args: str, token: str | None = None, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPTS / script), *args], env=env if env is not None else self.env(token), input=input,
            capture_output=True, text=True, timeout=120,
        )

    def argvs(self) -> list[list[str]]:
        """Every argv the Vault CLI was started with so far."""
        if not self.argv_log.exists():
            return []
        out = []
        for record in self.argv_log.read_bytes().split(b"\0\n"):
            if record:
                out.append([a.decode() for a in record.split(b"\0")])
        return out


def parse_kv_lines(text: str) -> list[dict[str, str]]:
    """setup-vault's stdout: KEY=VALUE lines, a new record at each bot=."""
    records: list[dict[str, str]] = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r}"
        if key == "bot":
            records.append({})
        records[-1][key] = value
    return records


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


STRACE_WRITES = "write,pwrite64,writev,pwritev,sendto,sendmsg"


def strace_prefix(log: Path) -> list[str]:
    """strace over a whole process tree, with each fd annotated by what it is (-y)."""
    import shutil

    exe = shutil.which("strace")
    if not exe:
        service_missing("strace not installed (apt-get install strace)")
    probe = subprocess.run([exe or "strace", "-f", "-o", "/dev/null", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        service_missing(f"strace cannot trace here: {probe.stderr.strip()[:200]}")
    return [exe or "strace", "-f", "-y", "-s", "65536", "-e", f"trace={STRACE_WRITES}", "-o", str(log)]


_FD = re.compile(r"^\d+\s+(?:\w+)\(\d+<([^>]*)>")


def secret_writes(log: Path, secret: str) -> tuple[list[str], list[str]]:
    """(writes of ``secret`` into files, writes of it into pipes/sockets) from an strace -y log."""
    to_files: list[str] = []
    in_transit: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        if secret not in line:
            continue
        m = _FD.match(line)
        target = m.group(1) if m else "?"
        if target.startswith(("pipe:", "socket:", "TCP", "UDP", "UNIX", "/dev/null")):
            in_transit.append(target)
        else:
            to_files.append(line[:200].replace(secret, "<SECRET>"))
    return to_files, in_transit
