"""Run many command lines of one program (`crit` or `crit_pageread`) in one interpreter, each in a fork.

usage: python cli_driver.py MODULE < JSON list of {"argv": [...], "stdin": path|null}
Prints a JSON list of {"rc", "out" (base64), "err"}. Each command runs in its own forked child
(fresh module globals, like a separate `python -m MODULE` run) with stdout/stderr in files.
"""

from __future__ import annotations

import base64
import json
import os
import runpy
import sys
import tempfile
import time


def main() -> None:
    module = sys.argv[1]
    jobs = json.load(sys.stdin)
    # Import once in the parent; every forked child inherits the loaded modules.
    if module == "crit":
        import crit.__main__  # noqa: F401
        import pycriu  # noqa: F401
    else:
        from crit_pageread.cli import crit_compat, main
        from crit_pageread.plugins import get_plugin_manager

        get_plugin_manager()
        main.build_parser()
        crit_compat.crit_main()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, job in enumerate(jobs):
            out_path, err_path = f"{tmp}/{i}.out", f"{tmp}/{i}.err"
            t0 = time.monotonic()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o600)
                    os.dup2(fd, 1)
                    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT, 0o600)
                    os.dup2(fd, 2)
                    fd = os.open(job.get("stdin") or os.devnull, os.O_RDONLY)
                    os.dup2(fd, 0)
                    sys.stdin = open(0, closefd=False)
                    sys.argv = [module, *job["argv"]]
                    try:
                        runpy.run_module(module, run_name="__main__", alter_sys=True)
                    except SystemExit as exc:
                        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    except BaseException:
                        import traceback

                        traceback.print_exc()
                        code = 99
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            with open(out_path, "rb") as f:
                out = f.read()
            with open(err_path, "rb") as f:
                err = f.read()
            results.append({"rc": os.waitstatus_to_exitcode(status), "out": base64.b64encode(out).decode(),
                            "err": err.decode(errors="replace"), "t": time.monotonic() - t0})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()


# --- for tests ---------------------------------------------------------------------------------


def crit_oracle_path(tmp: str, criu: str | None = None) -> str:
    """A directory holding only the `pycriu` and `crit` of `criu`'s CRIU (default: the one in use),
    as symlinks: on PYTHONPATH it runs that real crit program with the venv's protobuf."""
    from pathlib import Path

    from crit_pageread.criu_env import choose_pycriu_dir, pycriu_dir_of

    source = (pycriu_dir_of(criu) if criu else None) or choose_pycriu_dir()
    root = Path(tmp)
    for name in ("pycriu", "crit"):
        link = root / name
        if not link.exists():
            link.symlink_to(source / name)
    return str(root)


def run_jobs(module: str, jobs: list[dict], pythonpath: str | None = None) -> list[dict]:
    """Run `jobs` through this driver in a fresh interpreter; outputs decoded to bytes."""
    import subprocess
    from pathlib import Path

    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(Path(__file__)), module], input=json.dumps(jobs).encode(),
                          capture_output=True, env=env, timeout=600, check=True)
    results = json.loads(proc.stdout)
    for r in results:
        r["out"] = base64.b64decode(r["out"])
    return results
