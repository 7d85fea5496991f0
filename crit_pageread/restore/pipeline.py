"""Restore a checkpoint with real CRIU from Python, optionally post-copy from our own page server.

    from crit_pageread.restore.pipeline import restore

    result = restore("/path/to/images", leave_stopped=True)          # criu restore
    result = restore("/path/to/images", method="swrk")                # criu swrk through pycriu's RPC
    result = restore("/path/to/images", lazy=True)                    # post-copy (userfaultfd)
    print(result.pid)                                                 # the restored root task

With `lazy=True` the pipeline starts `crit-pageread serve` on the images
(in a thread, on a free loopback port), `criu lazy-pages --page-server`
against it, then `criu restore --lazy-pages`; pages marked `PE_LAZY` reach
the restored tasks through userfaultfd as they touch them (and in the
background until all are there). The pipeline waits for the lazy-pages
daemon to finish, then stops its server.

Plugins see every restore through the hooks `crit_pageread_before_restore`
(may change the options dict in place), `crit_pageread_pages_served` (fired
by the page server for each reply, lazy restores only),
`crit_pageread_after_restore` and `crit_pageread_restore_failed`.

The criu binary is the config's `criu` (or `$CRIT_PAGEREAD_CRIU`, the
provisioned one, PATH). The `[restore]` config table sets defaults for
the keyword arguments: method, leave_stopped, lazy, timeout, protocol, cpus.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, env_text, load_config
from ..criu_env import criu_binary, pycriu
from ..errors import ConfigError, ImageError, RestoreError
from ..hookspecs import hookimpl
from ..pageserver.protocol import AUTO
from ..plugins import get_plugin_manager

METHODS = ("binary", "swrk")
TABLE_KEYS: dict[str, Any] = {
    "method": str, "leave_stopped": bool, "lazy": bool, "timeout": (int, float), "protocol": str, "cpus": list,
}


@dataclass
class RestoreResult:
    """A finished restore: the restored root task and what the page server sent (lazy restores)."""

    images_dir: str
    pid: int
    method: str
    lazy: bool
    leave_stopped: bool
    log: str
    pages_served: int = 0
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.images_dir, "pid": self.pid, "method": self.method, "lazy": self.lazy,
            "leave_stopped": self.leave_stopped, "log": self.log, "pages_served": self.pages_served,
            "seconds": round(self.seconds, 3),
        }


def settings(config: Config) -> dict[str, Any]:
    """The validated `[restore]` table of the config (defaults for `restore()`)."""
    table = config.table("restore")
    for key, value in list(table.items()):
        expected = TABLE_KEYS.get(key)
        if expected is str:
            value = table[key] = env_text(value)
        if expected is None:
            raise ConfigError(f"[restore]: unknown key {key!r} (known: {', '.join(TABLE_KEYS)})")
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ConfigError(f"[restore]: key {key!r} has a bad value {value!r}")
    if table.get("method", "binary") not in METHODS:
        raise ConfigError(f"[restore]: key 'method' must be one of {', '.join(METHODS)}, not {table['method']!r}")
    return table


def restore(
    images_dir: str | os.PathLike[str],
    *,
    config: Config | None = None,
    method: str | None = None,
    leave_stopped: bool | None = None,
    lazy: bool | None = None,
    pages_dir: str | os.PathLike[str] | None = None,
    extra_args: list[str] | None = None,
    action_scripts: list[str] | None = None,
    cpus: set[int] | None = None,
    timeout: float | None = None,
    log_file: str = "restore.log",
) -> RestoreResult:
    """Restore `images_dir` with CRIU (detached); return the restored root task's pid.

    `method` "binary" runs `criu restore`, "swrk" drives `criu swrk` through
    pycriu's RPC (the restored root is then a child of this process: reap
    it). `lazy` restores post-copy from a page server we start on
    `pages_dir` (default: `images_dir`). `extra_args` go to `criu restore`
    as is; `action_scripts` become `--action-script` options (binary only);
    `cpus` pins CRIU and so the restored tasks. Fires the restore hooks.
    """
    config = config if config is not None else load_config()
    table = settings(config)
    given = str(images_dir)
    # CRIU works inside the image directory: every path it gets must not depend on our cwd.
    images_dir = Path(images_dir).absolute()
    if not images_dir.is_dir():
        raise ImageError(given, "no such image directory")
    options: dict[str, Any] = {
        "method": method or table.get("method", "binary"),
        "leave_stopped": table.get("leave_stopped", False) if leave_stopped is None else leave_stopped,
        "lazy": table.get("lazy", False) if lazy is None else lazy,
        "pages_dir": str(Path(pages_dir).absolute()) if pages_dir is not None else str(images_dir),
        "extra_args": list(extra_args or []),
        "action_scripts": [script_path(s) for s in action_scripts or []],
        "cpus": set(cpus) if cpus is not None else (set(table["cpus"]) if "cpus" in table else None),
        "timeout": float(timeout if timeout is not None else table.get("timeout", 120.0)),
        # Our page server for a lazy restore reads the layout of CRIU's lazy-pages from its requests.
        "protocol": env_text(table.get("protocol", config.table("remote").get("protocol", AUTO))),
        "criu": criu_binary(config.criu),
        "log_file": str(Path(log_file).absolute()) if os.sep in log_file else log_file,
    }
    hook = get_plugin_manager().hook
    started = time.monotonic()
    try:
        hook.crit_pageread_before_restore(images_dir=str(images_dir), options=options)
        if options["method"] not in METHODS:
            raise ConfigError(f"restore: method must be one of {', '.join(METHODS)}, not {options['method']!r}")
        if options["lazy"]:
            result = _restore_lazy(images_dir, config, options)
        elif options["method"] == "swrk":
            result = _restore_swrk(images_dir, options)
        else:
            result = _restore_binary(images_dir, options, [])
    except BaseException as exc:
        hook.crit_pageread_restore_failed(images_dir=str(images_dir), error=exc)
        raise
    result.seconds = time.monotonic() - started
    result.options = options
    result.images_dir = given
    hook.crit_pageread_after_restore(images_dir=str(images_dir), pid=result.pid)
    return result


def _preexec(cpus: set[int] | None) -> Any:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def script_path(script: str | os.PathLike[str]) -> str:
    """An action script as CRIU must get it: absolute if it names a path (CRIU runs it from inside the
    image directory), else as given (CRIU's execvp looks a bare name up in PATH)."""
    text = os.fspath(script)
    return str(Path(text).absolute()) if os.sep in text else text


#: CRIU's log lines that say Error but are not why a restore failed (it runs on without them).
_NOISE = re.compile(r"rlimit: Can't setup RLIMIT_|Can't set up RLIMIT|\bRLIMIT_\w+ for self")
_STAMP = re.compile(r"^\(\s*\d+\.\d+\)\s*")


def criu_cause(path: Path, stderr: str = "") -> str:
    """Why CRIU failed, cause first: an action script's complaint (the lines it wrote into the log), else
    CRIU's first real error, then its last one; RLIMIT warnings left out."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        text = stderr.splitlines()
    # Lines without CRIU's "(SS.UUUUUU)" stamp were written by its children: action scripts (or exec errors).
    children = [line.strip() for line in text if line.strip() and not _STAMP.match(line)]
    errors = [_STAMP.sub("", line) for line in text if "Error" in line and not _NOISE.search(line)]
    errors = [e for e in errors if e not in children]
    parts = children[-3:] or errors[:1]
    if errors and errors[-1] not in parts:
        parts.append(errors[-1])
    if not parts:
        parts = [_STAMP.sub("", line) for line in text[-3:]] or ["(no log)"]
    return " | ".join(parts)


def _log_tail(path: Path, lines: int = 8) -> str:
    return criu_cause(path)


def _restore_binary(images_dir: Path, options: dict[str, Any], more: list[str]) -> RestoreResult:
    pidfile = images_dir / f".crit-pageread-restore.{os.getpid()}.pid"
    pidfile.unlink(missing_ok=True)
    cmd = [options["criu"], "restore", "-D", str(images_dir), "-o", options["log_file"], "-v4",
           "--restore-detached", "--pidfile", str(pidfile), *more]
    if options["leave_stopped"]:
        cmd.append("--leave-stopped")
    for script in options["action_scripts"]:
        cmd += ["--action-script", script]
    cmd += options["extra_args"]
    log = images_dir / options["log_file"]
    started = time.time() - 1
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=options["timeout"],
                              preexec_fn=_preexec(options["cpus"]))
        if proc.returncode != 0:
            said = " | ".join(proc.stderr.strip().splitlines()[-3:])
            why = criu_cause(log) if log.exists() and log.stat().st_mtime >= started else said or "(no log)"
            raise RestoreError(images_dir, f"criu restore failed (exit {proc.returncode}): {why}")
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            raise RestoreError(images_dir, f"criu restore wrote no pid file: {_log_tail(log)}") from None
    except subprocess.TimeoutExpired:
        raise RestoreError(images_dir, f"criu restore took more than {options['timeout']:g} s") from None
    finally:
        pidfile.unlink(missing_ok=True)
    return RestoreResult(str(images_dir), pid, options["method"], bool(more), options["leave_stopped"], str(log))


def _restore_swrk(images_dir: Path, options: dict[str, Any]) -> RestoreResult:
    """`criu swrk` through pycriu's RPC client; the restored root becomes our child (rst_sibling)."""
    if options["action_scripts"] or options["extra_args"]:
        raise ConfigError("restore: action_scripts and extra_args need method 'binary' (the RPC has no such options)")
    if os.sep in options["log_file"]:  # CRIU's RPC refuses a log_file with a directory in it
        raise ConfigError(f"restore: method 'swrk' writes its log in the image directory: log_file "
                          f"{options['log_file']!r} must be a bare name (or use method 'binary')")
    pyc = pycriu()
    client = pyc.criu()
    client.use_binary(options["criu"])
    fd = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
    mask = os.sched_getaffinity(0)
    try:
        client.opts.images_dir_fd = fd
        client.opts.log_file = options["log_file"]
        client.opts.log_level = 4
        client.opts.rst_sibling = True
        client.opts.leave_stopped = bool(options["leave_stopped"])
        if options["cpus"]:
            os.sched_setaffinity(0, options["cpus"])  # swrk is forked from us: it inherits the mask
        try:
            resp = client.restore()
        except pyc.criu.CRIUException as exc:
            log = images_dir / options["log_file"]
            raise RestoreError(images_dir, f"criu swrk restore failed: {exc}: {_log_tail(log)}") from None
    finally:
        os.sched_setaffinity(0, mask)
        os.close(fd)
    return RestoreResult(str(images_dir), int(resp.pid), "swrk", False, bool(options["leave_stopped"]),
                         str(images_dir / options["log_file"]))


class _CountPages:
    """A plugin object that counts what our page server sent during one lazy restore."""

    def __init__(self) -> None:
        self.pages = 0
        self.lock = threading.Lock()

    @hookimpl
    def crit_pageread_pages_served(self, images: Any, pid: int, vaddr: int, nr_pages: int, peer: str) -> None:
        with self.lock:
            self.pages += nr_pages


def _restore_lazy(images_dir: Path, config: Config, options: dict[str, Any]) -> RestoreResult:
    from ..pageserver.server import PageServer, ServeOptions

    if options["method"] != "binary":
        raise ConfigError("restore: lazy restores need method 'binary' (criu lazy-pages runs beside criu restore)")
    counter = _CountPages()
    pm = get_plugin_manager()
    pm.register(counter, name=f"restore-pipeline-counter-{id(counter)}")
    server = PageServer(options["pages_dir"], config,
                        ServeOptions(address="127.0.0.1", port=0, protocol=options["protocol"],
                                     idle_timeout=options["timeout"]))
    thread = threading.Thread(target=server.serve_forever, name="restore-pipeline-serve", daemon=True)
    thread.start()
    socket_path = images_dir / "lazy-pages.socket"
    socket_path.unlink(missing_ok=True)
    daemon_log = "lazy-pages.log"
    daemon_cmd = [options["criu"], "lazy-pages", "--page-server", "--address", "127.0.0.1",
                  "--port", str(server.port), "-D", str(images_dir), "-o", daemon_log, "-v4"]
    daemon = subprocess.Popen(daemon_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, preexec_fn=_preexec(options["cpus"]))
    try:
        deadline = time.monotonic() + options["timeout"]
        while not socket_path.exists():
            if daemon.poll() is not None:
                raise RestoreError(images_dir, f"criu lazy-pages exited {daemon.returncode}: "
                                   f"{_log_tail(images_dir / daemon_log)}")
            if time.monotonic() > deadline:
                raise RestoreError(images_dir, f"criu lazy-pages did not start: {shlex.join(daemon_cmd)}")
            time.sleep(0.01)
        result = _restore_binary(images_dir, options, ["--lazy-pages"])
        try:
            code = daemon.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RestoreError(images_dir, "criu lazy-pages did not finish transferring pages in time") from None
        if code != 0:
            raise RestoreError(images_dir, f"criu lazy-pages failed (exit {code}): "
                               f"{_log_tail(images_dir / daemon_log)}")
        # A session counts its pages after sending them: the daemon may exit before the count, so the
        # sessions are ended (the server's close joins them) before reading it.
        server.shutdown()
        thread.join(timeout=options["timeout"] + 2)
        result.pages_served = counter.pages
        return result
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        server.shutdown()
        thread.join(timeout=options["timeout"] + 2)
        pm.unregister(counter)
        with contextlib.suppress(OSError):
            socket_path.unlink()
