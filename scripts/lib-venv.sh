# shellcheck shell=bash
# Shared by ./scripts/demo and ./scripts/test (sourced, not run): make the
# clone's .venv and install credbroker into it, saying one line per step and
# keeping pip quiet. pip's own output goes to a log that is shown only when
# pip fails, so the first screen a newcomer sees is credbroker's.

CB_STEP=${CB_STEP:-$(basename -- "$0")}
cb_step() { printf '%s: %s\n' "$CB_STEP" "$*" >&2; }

# cb_venv EXTRAS: set CB_VENV and CB_PY; create the venv if needed and
# install credbroker (editable) with EXTRAS (e.g. "test") into it.
cb_venv() {
  local extras=$1 log
  CB_VENV=${CREDBROKER_VENV:-.venv}
  CB_PY="$CB_VENV/bin/python"
  if [[ ! -x $CB_PY ]]; then
    cb_step "creating $CB_VENV ..."
    if ! python3 -m venv "$CB_VENV" >/dev/null 2>&1; then
      rm -rf -- "$CB_VENV"
      printf '%s: cannot create a virtual environment with %s (fix: install the venv module, e.g. apt-get install python3-venv)\n' \
        "$CB_STEP" "$(command -v python3 || echo python3)" >&2
      exit 1
    fi
  fi
  if [[ ${CREDBROKER_NO_INSTALL:-0} == 1 ]]; then  # the test suite runs the demo in its own venv, offline
    cb_step "using $CB_VENV as it is (CREDBROKER_NO_INSTALL=1)"
    return 0
  fi
  log=$(mktemp "${TMPDIR:-/tmp}/credbroker-pip.XXXXXX")
  cb_step "installing credbroker${extras:+ [$extras]} into $CB_VENV ..."
  if ! "$CB_PY" -m pip install --quiet --disable-pip-version-check --no-input -e ".${extras:+[$extras]}" >"$log" 2>&1; then
    cat -- "$log" >&2
    rm -f -- "$log"
    printf '%s: pip could not install credbroker into %s (its own error is above)\n' "$CB_STEP" "$CB_VENV" >&2
    exit 1
  fi
  rm -f -- "$log"
}
