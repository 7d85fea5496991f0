#!/usr/bin/env bash
# Set up everything crit-pageread needs on a fresh machine; quick and idempotent on rerun.
#  1. CRIU >= 4 and a matching pycriu, by crit_pageread/provision.py (the code behind
#     `crit-pageread setup-criu`, run here with the system's python3 before .venv exists):
#     the default criu (the system's if `criu check` passes, else Debian trixie's 4.1) and
#     CRIU 4.2 beside it (Debian sid's), unpacked with debootstrap under ~/.cache/crit-pageread,
#     reached through the wrappers ~/.cache/crit-pageread/bin/criu and bin/criu-4.2;
#  2. the virtual environment .venv with crit-pageread installed (editable, with dev tools);
#  3. pycriu importable from it (crit_pageread.criu_env picks the one matching the criu in use).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }
trap 'log "failed (line $LINENO)"' ERR

SYSPY=$(command -v python3 || true)
[ -n "$SYSPY" ] || { log "python3 is needed"; exit 1; }
# CRIT_PAGEREAD_SETUP_CRIU=4.1 provisions the default line only (all: both).
"$SYSPY" crit_pageread/provision.py --criu "${CRIT_PAGEREAD_SETUP_CRIU:-all}" >/dev/null \
    || { log "provisioning CRIU failed"; exit 1; }

command -v gcc >/dev/null || { log "installing gcc (tests build their victim programs)"; apt-get update -qq && apt-get install -y -qq gcc >/dev/null; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PY" -m venv .venv
fi
STAMP=.venv/.crit-pageread-installed
# The native helper's source too: a changed crit_pageread/_fastio.c is built again.
WANT=$( (echo "editable_mode=compat"; cat pyproject.toml crit_pageread/_fastio.c \
    $(find hooks -name pyproject.toml 2>/dev/null | sort)) | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || [ ! -x .venv/bin/crit-pageread ]; then
    log "installing crit-pageread into .venv"
    # compat mode: a .pth line with the project directory. The default (an import-hook finder)
    # costs every command about 10 ms of start-up.
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=compat \
        2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c 'import crit_pageread' || { log "pip install failed"; exit 1; }
    .venv/bin/python -c 'import crit_pageread._fastio' 2>/dev/null \
        || log "the native helper (crit_pageread/_fastio.c) did not build: the pure-Python code runs instead"
    echo "$WANT" > "$STAMP"
fi
# Byte-compile now: with PYTHONDONTWRITEBYTECODE set, every run would otherwise recompile (tens of ms).
.venv/bin/python -m compileall -q crit_pageread >/dev/null 2>&1 || true
.venv/bin/python -c 'from crit_pageread.criu_env import pycriu; pycriu()' \
    || { log "pycriu is not importable"; exit 1; }
