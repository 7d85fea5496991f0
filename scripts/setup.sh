#!/usr/bin/env bash
# Set up everything crit-pageread needs on a fresh machine; quick and idempotent on rerun.
#  1. a working CRIU >= 4: the system's if `criu check` passes, else Debian trixie's CRIU
#     unpacked with debootstrap under ~/.cache/crit-pageread/criu-root (outside the clone),
#     reached through the wrapper ~/.cache/crit-pageread/bin/criu;
#  2. the virtual environment .venv with crit-pageread installed (editable, with dev tools);
#  3. pycriu importable from it (crit_pageread.criu_env finds the provisioned copy).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/crit-pageread"
ROOT="${CRIT_PAGEREAD_CRIU_ROOT:-$CACHE/criu-root}"
WRAPPER="$CACHE/bin/criu"
log() { printf 'setup: %s\n' "$*" >&2; }
trap 'log "failed (line $LINENO)"' ERR

criu_works() {
    local v
    v=$("$@" --version 2>/dev/null | awk '/^Version/ {print $2}') || return 1
    [ -n "$v" ] && [ "${v%%.*}" -ge 4 ] || return 1
    "$@" check >/dev/null 2>&1
}

write_wrapper() {  # $1: a criu command line to exec
    mkdir -p "$CACHE/bin"
    printf '#!/bin/sh\nexec %s "$@"\n' "$1" > "$WRAPPER.tmp"
    chmod +x "$WRAPPER.tmp"
    mv "$WRAPPER.tmp" "$WRAPPER"
}

provision_trixie() {
    [ "$(id -u)" = 0 ] || { log "CRIU needs root: run as root (CRIU dumps and restores need it too)"; exit 1; }
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap"
        apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
    fi
    log "provisioning CRIU from Debian trixie into $ROOT (about 40 s, 280 MB)"
    rm -rf "$ROOT.tmp"
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --variant=minbase --include=criu,python3-pycriu trixie "$ROOT.tmp" >"$CACHE/debootstrap.log" 2>&1 \
        || { log "debootstrap failed, see $CACHE/debootstrap.log"; exit 1; }
    rm -rf "$ROOT"
    mv "$ROOT.tmp" "$ROOT"
}

if [ -x "$WRAPPER" ] && criu_works "$WRAPPER"; then
    :
elif command -v criu >/dev/null && criu_works criu; then
    write_wrapper "$(command -v criu)"
    log "using the system's $(criu --version | head -1)"
else
    [ -x "$ROOT/usr/sbin/criu" ] || provision_trixie
    write_wrapper "'$ROOT/usr/lib64/ld-linux-x86-64.so.2' --library-path '$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/lib/x86_64-linux-gnu' '$ROOT/usr/sbin/criu'"
    criu_works "$WRAPPER" || { log "the provisioned CRIU fails 'criu check': $("$WRAPPER" check 2>&1 | tail -1)"; exit 1; }
    log "using $("$WRAPPER" --version | head -1) from $ROOT"
fi

command -v gcc >/dev/null || { log "installing gcc (tests build their victim programs)"; apt-get update -qq && apt-get install -y -qq gcc >/dev/null; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PY" -m venv .venv
fi
STAMP=.venv/.crit-pageread-installed
WANT=$( (echo "editable_mode=compat"; cat pyproject.toml $(find hooks -name pyproject.toml 2>/dev/null | sort)) \
    | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || [ ! -x .venv/bin/crit-pageread ]; then
    log "installing crit-pageread into .venv"
    # compat mode: a .pth line with the project directory. The default (an import-hook finder)
    # costs every command about 10 ms of start-up.
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=compat \
        2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c 'import crit_pageread' || { log "pip install failed"; exit 1; }
    echo "$WANT" > "$STAMP"
fi
# Byte-compile now: with PYTHONDONTWRITEBYTECODE set, every run would otherwise recompile (tens of ms).
.venv/bin/python -m compileall -q crit_pageread >/dev/null 2>&1 || true
.venv/bin/python -c 'from crit_pageread.criu_env import pycriu; pycriu()' \
    || { log "pycriu is not importable"; exit 1; }
