#!/usr/bin/env python3
"""Run credbroker with odd input everywhere a user gives some, and list what was not a one-line error.

    python scripts/fuzz_inputs.py options   # every option of every subcommand (~600 runs, ~3 min)
    python scripts/fuzz_inputs.py env       # every variable credbroker reads (~1,800 runs, ~10 min)
    python scripts/fuzz_inputs.py config    # every config key, under 5 commands (~6,000 runs, ~20 min)
    python scripts/fuzz_inputs.py all

The promise under test (README, "Security"): bad input of every kind gets a
clear one-line error, never a traceback or an "internal error". Each run is
``credbroker`` in a fresh HOME with no Vault reachable (VAULT_ADDR is a closed
loopback port), so every command fails early, as it should, and only the shape
of the failure is judged: stderr of more than one line, a traceback, an
"internal error", or a run that does not end within 30 s. Odd values: numbers
too large for a timer, negative, NaN, digits that are digits to ``str.isdigit``
but not to ``int()`` (superscript two), Arabic-Indic digits, line breaks, 3,000
characters, an unclosed IPv6 bracket, a port past 65535, wrong TOML types.

Not a test (minutes, not seconds; what it finds becomes a test of the module
at fault): a tool for finding the neighbours of a bug. Exit status 1 when it
found something.

Every value that names a place stays in the run's temporary folder: each run
starts in a folder two levels down in it (so "../../escape" lands in it too),
no value is an absolute path, and the variables that say where credbroker
writes (HOME, XDG_*, CREDBROKER_AUDIT_LOG, ...) are never set empty (empty
falls back to the real user's home). A first version passed "/etc/passwd"
and "/" as values: run as root, `audit report --out ../../etc/passwd` and
CREDBROKER_AUDIT_LOG=/etc/passwd did what they were told to that machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Option and variable values.
VALUES = ["", "\u00b2", "\u0663", "-1", "0", "99999999999999999999999", "1e400", "nan", " 5 ", "x\ny", "a" * 3000,
          "../../escape", "no/such/folder/x", "http://[::1", "http://127.0.0.1:99999", "://"]
#: Variables that say where credbroker reads or writes its files: never empty here (see the docstring).
PLACES = {"HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "CREDBROKER_AUDIT_LOG", "CREDBROKER_DAEMON_SOCKET",
          "CREDBROKER_CONFIG", "CREDBROKER_ROLE_ID_FILE", "CREDBROKER_SECRET_ID_FILE"}
#: Config values (TOML).
TOML_VALUES = ["-1", "0", "99999999999999999999999", "1.5", "nan", "inf", '""', '"\u00b2"', '"x\\ny"', "[]", "{}",
               "true", '"' + "a" * 3000 + '"', '["a", 1]', "{ a = 1 }", '"-5"', '"1e3"', '"../../x"',
               '"http://[::1"', '"https://127.0.0.1:99999"']

VARIABLES = ("BAO_ADDR BAO_CACERT BAO_NAMESPACE BAO_SKIP_VERIFY BAO_TOKEN CREDBROKER_APPROLE_MOUNT "
             "CREDBROKER_AUDIT_FD CREDBROKER_AUDIT_KEY CREDBROKER_AUDIT_LOG CREDBROKER_CONFIG CREDBROKER_DAEMON "
             "CREDBROKER_DAEMON_SOCKET CREDBROKER_PREFLIGHT_URL CREDBROKER_ROLE_ID_FILE CREDBROKER_SECRET_ID_FILE "
             "CREDBROKER_VAULT_ADDRS CREDBROKER_VAULT_AUTH CREDBROKER_VAULT_TIMEOUT VAULT_ADDR VAULT_CACERT "
             "VAULT_CAPATH VAULT_CLIENT_CERT VAULT_CLIENT_KEY VAULT_NAMESPACE VAULT_SKIP_VERIFY "
             "VAULT_TLS_SERVER_NAME VAULT_TOKEN XDG_RUNTIME_DIR XDG_STATE_HOME HOME").split()

#: Config tables and their keys (the parsers' own lists: broker/config.py, audit/settings.py,
#: proxy/settings.py, signing/settings.py, signing_policy.py, rotation.py, vault/origins.py).
CONFIG_KEYS = {
    "vault": "addr addrs namespace cacert capath client_cert client_key tls_server_name timeout auth "
             "approle_mount role_id_file secret_id_file",
    "audit": "path key rotate max_size keep work_hours anchor anchor_interval fsync",
    "profiles.p": "source env description path mount version transit_key transit_mount",
    "profiles.k": "service backend",
    "profiles.p.signer": "type key_field api_key_field passphrase_field recv_window transit_key transit_mount "
                         "token_role",
    "profiles.p.policy": "rate_limit burst symbols max_quantity max_notional max_recv_window deny_kinds deny_params "
                         "deny_endpoints require_endpoint",
    "profiles.p.rotation": "on_rotate interval grace",
    "profiles.p.proxy": "testnet spot futures unsafe_plain_http_loopback client_key ca_file ws_spot ws_futures "
                        "rate_limits rotation_interval",
}
BASE_CONFIG = {
    "profiles.p": {"source": '"vault"', "path": '"secret/credbroker/p"', "env": '{ A = "api_key", B = "api_secret" }'},
    "profiles.k": {"source": '"keyring"', "service": '"credbroker/k"', "env": '{ A = "api_key" }'},
}
BASE_CONFIG_TEXT = '[profiles.p]\nsource = "vault"\npath = "secret/credbroker/p"\nenv = { A = "api_key" }\n'


class Fuzz:
    def __init__(self, credbroker: str) -> None:
        self.credbroker = credbroker
        self.home = Path(tempfile.mkdtemp(prefix="credbroker-fuzz-"))
        self.cwd = self.home / "w" / "x"  # "../../escape" from here is still in the temporary folder
        self.cwd.mkdir(parents=True)
        self.config = self.home / "credbroker.toml"
        self.config.write_text(BASE_CONFIG_TEXT)
        self.env = {"HOME": str(self.home), "PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(self.home),
                    "CREDBROKER_DAEMON": "0", "LANG": "C.UTF-8", "VAULT_ADDR": "http://127.0.0.1:1",
                    "VAULT_TOKEN": "fuzz", "CREDBROKER_CONFIG": str(self.config)}
        self.runs = 0
        self.found: dict[tuple[str, ...], str] = {}

    def run(self, args: list[str], what: tuple[str, ...], env: dict[str, str] | None = None) -> None:
        self.runs += 1
        try:
            res = subprocess.run([self.credbroker, *args], env=env or self.env, capture_output=True, text=True,
                                 timeout=30, stdin=subprocess.DEVNULL, cwd=self.cwd)
        except subprocess.TimeoutExpired:
            self.found.setdefault(what, "did not end within 30 s")
            return
        err = res.stderr.strip()
        if "internal error" in err or "Traceback" in err or len(err.splitlines()) > 1:
            self.found.setdefault(what, f"exit {res.returncode}: {err[:300]!r}")

    def options(self) -> None:
        import click

        sys.path.insert(0, str(REPO))
        from broker.cli import cli

        ctx = click.Context(cli)

        def walk(cmd: click.Command, path: list[str]):  # type: ignore[no-untyped-def]
            if isinstance(cmd, click.Group):
                for name in cmd.list_commands(ctx):
                    sub = cmd.get_command(ctx, name)
                    if sub is not None:
                        yield from walk(sub, [*path, name])
            else:
                yield path, cmd

        for path, cmd in walk(cli, []):
            if path == ["daemon"]:
                continue  # a server: it runs until stopped, whatever its socket's name
            for param in cmd.params:
                if not isinstance(param, click.Option) or param.is_flag or param.count:
                    continue
                opt = max(param.opts, key=len)
                for value in VALUES:
                    tail = ["--", "true"] if path == ["run"] else []
                    self.run([*path, opt, value, *tail], (" ".join(path), opt, value[:20]))

    def variables(self) -> None:
        commands = [["check", "-p", "p"], ["run", "-p", "p", "--agent", "--", "true"], ["audit", "verify"],
                    ["profiles"]]
        for var in VARIABLES:
            for value in VALUES:
                if var in PLACES and not value:
                    continue
                for args in commands:
                    self.run(args, (var, value[:20], args[0]), {**self.env, var: value})

    def config_keys(self) -> None:
        commands = [["profiles"], ["check", "-p", "p"], ["run", "-p", "p", "--agent", "--", "true"],
                    ["run", "-p", "p", "--proxy", "--", "true"], ["audit", "verify"]]
        for table, keys in CONFIG_KEYS.items():
            for key in keys.split():
                for value in TOML_VALUES:
                    tables = {name: dict(kv) for name, kv in BASE_CONFIG.items()}
                    tables.setdefault(table, {})[key] = value
                    text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items())
                                   for name, kv in tables.items())
                    self.config.write_text(text)
                    for args in commands:
                        self.run(args, (f"{table}.{key}", value[:20], " ".join(args[:2])))
        self.config.write_text(BASE_CONFIG_TEXT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("options", "env", "config", "all"))
    args = parser.parse_args()
    credbroker = shutil.which("credbroker", path=os.path.dirname(sys.executable)) or shutil.which("credbroker")
    if not credbroker:
        sys.exit("fuzz_inputs: credbroker is not installed in this environment (pip install -e .)")
    fuzz = Fuzz(credbroker)
    try:
        if args.what in ("options", "all"):
            fuzz.options()
        if args.what in ("env", "all"):
            fuzz.variables()
        if args.what in ("config", "all"):
            fuzz.config_keys()
    finally:
        shutil.rmtree(fuzz.home, ignore_errors=True)
    print(f"{fuzz.runs} runs, {len(fuzz.found)} not a one-line error")
    for what, how in fuzz.found.items():
        print(f"  {' | '.join(what)}: {how}")
    sys.exit(1 if fuzz.found else 0)


if __name__ == "__main__":
    main()
