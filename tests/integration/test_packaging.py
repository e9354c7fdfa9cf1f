"""What a user gets from `pip install`: the wheel's contents, the shipped policies, and a test venv
whose packages do not overwrite each other."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import cli
from broker.cli.policy import POLICIES, policy_text
from broker.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent.parent


def test_every_policy_in_vault_policies_ships_in_the_package() -> None:
    shipped = {p.name: p for p in (REPO / "broker" / "policies").glob("*.hcl")}
    sources = sorted((REPO / "vault-policies").glob("*.hcl"))
    assert sources and sorted(shipped) == [p.name for p in sources]
    for src in sources:
        assert shipped[src.name].read_bytes() == src.read_bytes()
    assert sorted(POLICIES) == sorted(p.stem.removeprefix("credbroker-") for p in sources)


def test_policy_show_fills_in_the_bot_template() -> None:
    result = CliRunner().invoke(cli, ["policy", "show", "bot", "--name", "alpha"])
    assert result.exit_code == 0, result.output
    assert 'path "secret/data/credbroker/alpha"' in result.output
    assert "__BOT__" not in result.output
    host = CliRunner().invoke(cli, ["policy", "show", "audit-anchor", "--name", "bot-host.1"])
    assert host.exit_code == 0 and 'path "secret/data/credbroker-audit/bot-host.1/*"' in host.output
    assert "__HOST__" not in host.output
    admin = CliRunner().invoke(cli, ["policy", "show", "admin"])
    assert admin.exit_code == 0 and admin.output == (REPO / "vault-policies" / "credbroker-admin.hcl").read_text()


@pytest.mark.parametrize("args", [["bot"], ["bot", "--name", "../x"], ["bot", "--name", "a/b"],
                                  ["bot", "--name", "a*"], ["admin", "--name", "alpha"], ["nosuch"],
                                  ["audit-anchor"], ["audit-anchor", "--name", "h/../x"]])
def test_policy_show_refuses_what_could_widen_or_mislead(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["policy", "show", *args])
    assert result.exit_code != 0
    assert "path " not in result.output  # no HCL printed on a mistake


@pytest.mark.parametrize("policy, name", [("bot", "alpha\n"), ("bot", "a/b"), ("audit-anchor", "host\n")])
def test_a_template_name_that_could_widen_or_break_the_policy_is_refused(policy: str, name: str) -> None:
    # A line break at the end: "$" in the name's pattern matches before it, so it once passed.
    with pytest.raises(ConfigError, match="invalid"):
        policy_text(policy, name)
    valid = name.strip().replace("/", "")
    assert valid in policy_text(policy, valid)


def test_policy_text_is_the_file_for_fixed_policies() -> None:
    assert policy_text("credbroker-auditor") == (REPO / "vault-policies" / "credbroker-auditor.hcl").read_text()


def test_the_wheel_ships_py_typed_and_the_policies_as_real_files(tmp_path: Path) -> None:
    """A wheel built from the clone has py.typed and each policy's text (not a link to a clone)."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--disable-pip-version-check", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("credbroker-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "broker/py.typed" in names
        for src in (REPO / "vault-policies").glob("*.hcl"):
            assert zf.read(f"broker/policies/{src.name}") == src.read_bytes()


def test_no_two_installed_packages_write_the_same_file() -> None:
    """binance-connector, binance-futures-connector and python-binance all install a `binance/` folder
    and overwrite each other's files: the test venv must hold at most one of them."""
    owners: dict[str, set[str]] = defaultdict(set)
    for dist in metadata.distributions():
        for f in dist.files or ():
            parts = f.parts
            if not parts or parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info", ".data")):
                continue
            if "__pycache__" in parts:
                continue
            owners[str(f)].add(dist.metadata["Name"])
    clashes = {path: names for path, names in owners.items() if len(names) > 1}
    assert not clashes, f"installed packages overwrite each other's files: {sorted(clashes.items())[:5]}"


def test_the_cli_reference_in_docs_is_current() -> None:
    """docs/cli.md is every command's --help; regenerate it with scripts/gen-cli-reference."""
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-cli-reference"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_the_repository_tracks_no_link_but_the_policy_links() -> None:
    """A worktree's set-up links (``.venv-clients`` -> another checkout) must never be committed: merged,
    they replace the real folder with a link to itself. The only links the project means are the
    package-data links to ``vault-policies/``."""
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout (an installed copy)")
    listing = subprocess.run(["git", "-C", str(root), "ls-files", "-s"], capture_output=True, text=True, check=True)
    links = [line.split("\t", 1)[1] for line in listing.stdout.splitlines() if line.startswith("120000 ")]
    assert links, "the policy links in broker/policies/ are tracked"
    assert [p for p in links if not p.startswith("broker/policies/")] == []
