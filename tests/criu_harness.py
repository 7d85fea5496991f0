"""Real CRIU for tests: build the victim, checkpoint it, restore it stopped, read /proc/PID/mem.

The oracle no reader of ours wrote: `criu restore --leave-stopped` puts the
dumped memory back into real (stopped) tasks, and `/proc/PID/mem` is read at
every address the pagemap lists. Everything runs pinned to CPU 0, so glibc's
rseq area (which holds the CPU number) matches between dump and restore.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crit_pageread.criu_env import criu_binary

HERE = Path(__file__).parent
VICTIM_C = HERE.parent / "crit_pageread" / "data" / "victim.c"
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make restored tasks (detached by CRIU) our children, so we can reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _pin() -> None:
    os.sched_setaffinity(0, {0})


def run_criu(args: list[str], *, timeout: float = 120, check: bool = True, log: Path | None = None,
             **popen: Any) -> subprocess.CompletedProcess[str]:
    """Run criu with `args` pinned to CPU 0; on failure raise with the tail of its log."""
    cmd = [criu_binary(), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=_pin, **popen)
    if check and proc.returncode != 0:
        tail = ""
        if log is not None and log.exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"criu {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}\n{tail}")
    return proc


def build_victim(out_dir: Path) -> Path:
    """Compile the victim (crit_pageread/data/victim.c, shared with the demo) into out_dir."""
    exe = out_dir / "victim"
    if not exe.exists():
        subprocess.run(["gcc", "-O1", "-o", str(exe), str(VICTIM_C), "-lpthread"], check=True)
    return exe


@dataclass
class Region:
    name: str
    start: int
    len: int
    id: int
    hole_every: int


@dataclass
class Victim:
    """A running victim: its info JSON (regions, secret, children, threads) and process."""

    proc: subprocess.Popen[bytes]
    info_path: Path
    info: dict[str, Any] = field(default_factory=dict)
    #: With pid_ns=True: the host pid of the victim (init of its own pid namespace, pid 1 inside).
    host_pid: int | None = None

    @property
    def pid(self) -> int:
        """The pid to dump and to read /proc of (the host pid in a pid namespace)."""
        return self.host_pid if self.host_pid is not None else int(self.info["pid"])

    @property
    def image_pid(self) -> int:
        """The pid CRIU names the images after (1 for a victim in its own pid namespace)."""
        return int(self.info["pid"])

    @property
    def regions(self) -> list[Region]:
        return [Region(**r) for r in self.info["regions"]]

    def child_info(self, index: int) -> dict[str, Any]:
        return json.loads(Path(f"{self.info_path}.child{index}").read_text())

    @property
    def all_pids(self) -> list[int]:
        own = [self.host_pid] if self.host_pid is not None else []
        return [self.proc.pid, *own, *self.info.get("children", [])]

    def reap(self, timeout: float = 10) -> None:
        """Wait for the tree to be gone (after a dump killed it), so its pids are free again."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        for pid in self.info.get("children", []):
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    if not os.path.exists(f"/proc/{pid}"):
                        break
                    done = 0
                if done:
                    break
                time.sleep(0.01)

    def kill(self) -> None:
        for pid in self.all_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.reap()


def start_victim(exe: Path, workdir: Path, *args: str, env: dict[str, str] | None = None,
                 ipc_ns: bool = False, timeout: float = 20, pid_ns: bool = False) -> Victim:
    """Start the victim in its own session (and IPC namespace if asked); wait until it is ready.

    With `pid_ns` it runs as init of its own pid namespace (`unshare -p -f setsid`), so its pid
    is free for a restore on this host; its images are then named after pid 1."""
    become_subreaper()
    workdir.mkdir(parents=True, exist_ok=True)
    info = workdir / "victim.json"
    cmd = [str(exe), str(info), *args]
    if ipc_ns:
        cmd = ["unshare", "--ipc", *cmd]
    if pid_ns:
        # The victim logs to its own file: unshare may write to victim.log when the victim dies,
        # and CRIU restores the victim's open log only if its size is unchanged.
        cmd = ["unshare", "-p", "-f", "setsid", "sh", "-c", 'exec "$@" >victim-ns.log 2>&1', "sh", *cmd]
    log = open(workdir / "victim.log", "wb")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        preexec_fn=_pin, env=env if env is not None else {"PATH": "/usr/bin:/bin", "VICTIM": "1"},
        cwd=workdir,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while not info.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"victim exited {proc.returncode}: {(workdir / 'victim.log').read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("victim did not become ready")
        time.sleep(0.01)
    victim = Victim(proc, info, json.loads(info.read_text()))
    if pid_ns:
        victim.host_pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    for i in range(len(victim.info["children"])):
        child = Path(f"{info}.child{i}")
        while not child.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("victim child did not become ready")
            time.sleep(0.01)
    return victim


def dump(victim: Victim | int, images: Path, *extra: str, timeout: float = 180) -> Path:
    """`criu dump -t PID -D images`; the dump kills the tree (reaped here) unless extra has
    `--leave-running`."""
    images.mkdir(parents=True, exist_ok=True)
    log = images / "dump.log"
    pid = victim.pid if isinstance(victim, Victim) else victim
    run_criu(["dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "-v4", *extra],
             timeout=timeout, log=log)
    if isinstance(victim, Victim) and "--leave-running" not in extra:
        victim.reap()
    return images


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None,
                   timeout: float = 20) -> None:
    """Wait until something listens on 127.0.0.1:port, without connecting (CRIU accepts only once)."""
    needle = f"0100007F:{port:04X} 00000000:0000 0A"
    deadline = time.monotonic() + timeout
    while needle not in Path("/proc/net/tcp").read_text():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port}")
        time.sleep(0.01)


def start_lazy_dump(victim: Victim | int, images: Path, *extra: str,
                    timeout: float = 30) -> tuple[subprocess.Popen[bytes], int]:
    """`criu dump --lazy-pages` on a free loopback port; returns (criu, port) once the images are
    written and CRIU serves the lazy pages (it accepts one client; CLOSE ends the dump)."""
    images.mkdir(parents=True, exist_ok=True)
    port = free_port()
    pid = victim.pid if isinstance(victim, Victim) else victim
    proc = subprocess.Popen(
        [criu_binary(), "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "-v4",
         "--lazy-pages", "--address", "127.0.0.1", "--port", str(port), *extra],
        preexec_fn=_pin,
    )
    try:
        wait_listening(port, proc, timeout)
    except RuntimeError:
        proc.kill()
        proc.wait()
        log = images / "dump.log"
        raise RuntimeError(f"lazy dump failed: {log.read_text()[-2000:] if log.exists() else ''}") from None
    return proc, port


def read_mem(host_pid: int, vaddr: int, length: int) -> bytes:
    """Bytes of a (stopped) task's memory from /proc/PID/mem."""
    fd = os.open(f"/proc/{host_pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, length, vaddr)
    finally:
        os.close(fd)


class Restored:
    """Tasks restored with --leave-stopped: map image pids to host pids, read their memory."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.pids: dict[int, int] = {}
        self._collect(root_pid)

    def _collect(self, host_pid: int) -> None:
        status = Path(f"/proc/{host_pid}/status").read_text()
        nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
        self.pids[int(nspid[-1])] = host_pid
        for task in os.listdir(f"/proc/{host_pid}/task"):
            children = Path(f"/proc/{host_pid}/task/{task}/children").read_text().split()
            for child in children:
                self._collect(int(child))

    def host_pid(self, image_pid: int) -> int:
        return self.pids[image_pid]

    def read(self, image_pid: int, vaddr: int, length: int) -> bytes:
        return read_mem(self.pids[image_pid], vaddr, length)

    def threads(self, image_pid: int) -> list[int]:
        return sorted(int(t) for t in os.listdir(f"/proc/{self.pids[image_pid]}/task"))

    def kill(self) -> None:
        for pid in self.pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.pids.values():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


@contextmanager
def restore_stopped(images: Path, *extra: str, timeout: float = 120) -> Iterator[Restored]:
    """`criu restore --leave-stopped --restore-detached`; yields the stopped tree, kills it after."""
    pidfile = images / "restore.pid"
    pidfile.unlink(missing_ok=True)
    become_subreaper()
    run_criu(["restore", "-D", str(images), "-o", "restore.log", "-v4", "--leave-stopped",
              "--restore-detached", "--pidfile", str(pidfile), *extra], timeout=timeout,
             log=images / "restore.log")
    restored = Restored(int(pidfile.read_text().strip()))
    try:
        yield restored
    finally:
        restored.kill()


def pycriu_load(path: Path) -> list[dict[str, Any]]:
    """pycriu's entries of an image, decoded by the pycriu of the CRIU in use (CRIT_PAGEREAD_CRIU):
    in this process if that is the one loaded, else in a child process that loads it (pycriu 4.1
    cannot see a 4.2 pagemap's page counts). Pagemap entries get `nr_pages` from either field."""
    import sys

    from crit_pageread import provision
    from crit_pageread.criu_env import criu_line, pycriu

    loaded = pycriu()
    version = provision.pycriu_version(Path(loaded.__file__ or "").parent.parent) or ""
    if provision.line_of(version) == (criu_line() or provision.line_of(version)):
        with open(path, "rb") as f:
            entries = list(loaded.images.load(f)["entries"])
    else:
        code = ("import json, sys; from crit_pageread.criu_env import pycriu; "
                "print(json.dumps(pycriu().images.load(open(sys.argv[1], 'rb'))['entries']))")
        env = dict(os.environ)
        env.pop("CRIT_PAGEREAD_PYCRIU_PATH", None)
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                              check=True, timeout=120)
        entries = list(json.loads(proc.stdout))
    if Path(path).name.startswith("pagemap-"):
        for e in entries[1:]:
            e["nr_pages"] = e.get("nr_pages") or e.get("compat_nr_pages", 0)
    return entries


def pagemap_pages(images_dir: Path, pid: int) -> list[int]:
    """Every page address listed by pagemap-PID.img (present, parent or lazy), via pycriu."""
    out = []
    for e in pycriu_load(images_dir / f"pagemap-{pid}.img")[1:]:
        out.extend(e["vaddr"] + i * 4096 for i in range(e["nr_pages"]))
    return out
