"""The campaign: mutants of real checkpoints through the library (every page, every strategy), one command each,
and hostile page-server requests; every outcome classified against the page model (`fuzz.model`).

Outcome classes:
- "exact": every page the model defines was read back with its bytes (and lazy pages were refused as lazy);
- "clean-error": a one-line typed error (library: a CritPageReadError; command: one stderr line, no traceback);
- non-clean: "traceback" (any other exception, or a command's multi-line stderr), "hang" (no answer within the
  time limit), "wrong-bytes" (bytes that differ from the model's), "accepted-inconsistent" (bytes returned for a
  checkpoint the model says CRIU never writes), "refused-consistent" (an error for a checkpoint whose only
  change was to pages the model reads, bytes that are still defined), "unbounded-memory" (MemoryError or killed
  under the address-space limit).

Each mutant runs in a forked child (the parent already imported everything) under an address-space limit and
an alarm, so a hang or a runaway allocation is seen, not suffered.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import model
from .mutate import clone, mutate

NON_CLEAN = ("traceback", "hang", "wrong-bytes", "accepted-inconsistent", "refused-consistent", "unbounded-memory")
STRATEGIES = ("pread", "preadv", "mmap")
COMMANDS = ("read", "extract", "coredump", "check", "pages", "ps", "squash", "decode")


@dataclass
class Results:
    """Counts per outcome class, for the library runs and the command runs, with the non-clean cases."""

    mutants: int = 0
    library: Counter[str] = field(default_factory=Counter)
    commands: Counter[str] = field(default_factory=Counter)
    server: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def non_clean(self) -> int:
        return sum(c[k] for c in (self.library, self.commands, self.server) for k in NON_CLEAN)

    def as_dict(self) -> dict[str, Any]:
        return {"mutants": self.mutants, "library": dict(self.library), "commands": dict(self.commands),
                "server_requests": dict(self.server), "non_clean": self.non_clean(), "failures": self.failures[:50]}


# --- the model's expectation of a mutant ---------------------------------------------------------------------


def expectation(top: Path, pids: list[int]) -> dict[int, dict[int, model.Page] | str]:
    """Per pid: the model's pages (vaddr -> Page), or the reason the checkpoint is inconsistent."""
    out: dict[int, dict[int, model.Page] | str] = {}
    for pid in pids:
        try:
            out[pid] = model.Memory(top, f"pagemap-{pid}.img").all_pages()
        except model.Inconsistent as exc:
            out[pid] = str(exc)
        except OSError as exc:
            out[pid] = f"unreadable: {exc}"
    return out


def _runs(pages: dict[int, model.Page]) -> list[tuple[int, bytes]]:
    """Contiguous runs of data pages as (vaddr, bytes)."""
    out: list[tuple[int, bytearray]] = []
    for vaddr in sorted(pages):
        page = pages[vaddr]
        if page.kind != "data":
            continue
        if out and out[-1][0] + len(out[-1][1]) == vaddr:
            out[-1][1].extend(page.data)
        else:
            out.append((vaddr, bytearray(page.data)))
    return [(v, bytes(b)) for v, b in out]


# --- the child's work ------------------------------------------------------------------------------------------


def _library(top: Path, expected: dict[int, dict[int, model.Page] | str], only_pages: bool) -> list[dict[str, Any]]:
    """Read every page of every pid with every strategy; classify each (strategy, pid)."""
    from crit_pageread import CritPageReadError, LazyPageError, open_images

    verdicts = []
    for strategy in STRATEGIES:
        for pid, want in expected.items():
            verdict = {"strategy": strategy, "pid": pid}
            try:
                with open_images(top) as images, images.reader(pid, strategy) as reader:
                    if isinstance(want, str):
                        for entry in reader.pagemap.entries:  # everything it would read
                            with contextlib.suppress(LazyPageError):
                                reader.read(entry.vaddr, entry.size)
                        verdict.update(outcome="accepted-inconsistent", detail=want)
                    else:
                        runs = _runs(want)
                        for vaddr, data in runs:
                            got = reader.read(vaddr, len(data))
                            if got != data:
                                bad = next(i for i in range(0, len(data), 4096) if got[i:i + 4096] != data[i:i + 4096])
                                raise _Wrong(f"page {vaddr + bad:#x} differs ({strategy})")
                        bufs = [(v, bytearray(len(d))) for v, d in runs]
                        reader.readv(bufs)  # one planned batch of every run
                        if any(bytes(b) != d for (_, b), (_, d) in zip(bufs, runs, strict=True)):
                            raise _Wrong(f"readv differs ({strategy})")
                        for vaddr, page in want.items():
                            if page.kind == "lazy":
                                try:
                                    reader.read(vaddr, 4096)
                                    raise _Wrong(f"lazy page {vaddr:#x} read without a page server")
                                except LazyPageError:
                                    pass
                                break
                        verdict["outcome"] = "exact"
            except _Wrong as exc:
                verdict.update(outcome="wrong-bytes", detail=str(exc))
            except MemoryError:
                verdict.update(outcome="unbounded-memory", detail="MemoryError")
            except CritPageReadError as exc:
                text = str(exc)
                if "\n" in text:
                    verdict.update(outcome="traceback", detail=f"multi-line error: {text[:300]}")
                elif isinstance(want, dict) and only_pages:
                    verdict.update(outcome="refused-consistent", detail=text[:300])
                else:
                    verdict.update(outcome="clean-error", detail=text[:200])
            except Exception as exc:
                import traceback

                verdict.update(outcome="traceback", detail="".join(traceback.format_exception(exc))[-1500:])
            verdicts.append(verdict)
    return verdicts


class _Wrong(Exception):
    pass


def _command(top: Path, pid: int, command: str, expected: dict[int, dict[int, model.Page] | str],
             work: Path) -> dict[str, Any]:
    """Run one command through `main()` with its output in files; classify it."""
    from crit_pageread.cli.main import main

    want = expected.get(pid)
    argv: list[str]
    probe: tuple[int, bytes] | None = None
    if command == "read":
        runs = _runs(want) if isinstance(want, dict) else []
        probe = runs[len(runs) // 2] if runs else None
        addr, length = (probe[0], len(probe[1])) if probe else (0x10000, 4096)
        argv = ["read", str(top), "--pid", str(pid), hex(addr), str(length), "-o", str(work / "out.bin")]
    elif command == "extract":
        argv = ["extract", str(top), "-o", str(work / "x")]
    elif command == "coredump":
        argv = ["coredump", str(top), "-o", str(work / "cores")]
    elif command == "squash":
        argv = ["squash", str(top), str(work / "sq"), "--verify"]
    elif command == "decode" and top.is_dir():
        argv = ["decode", "-i", str(top / f"pagemap-{pid}.img"), "--pages", "-o", str(work / "d.json")]
    else:
        argv = [command if command != "decode" else "pages", str(top)]
    err = io.StringIO()
    with open(work / "stdout", "wb") as so:  # a forked child: its fd 1 is ours to point at a file
        os.dup2(so.fileno(), 1)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 2
    except MemoryError:
        return {"command": command, "outcome": "unbounded-memory", "detail": "MemoryError"}
    except BaseException as exc:
        import traceback

        return {"command": command, "outcome": "traceback", "detail": "".join(traceback.format_exception(exc))[-1500:]}
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
    lines = err.getvalue().splitlines()
    verdict: dict[str, Any] = {"command": command, "rc": rc}
    if rc == 0:
        verdict["outcome"] = "exact"
        if command == "read" and probe is not None:
            if (work / "out.bin").read_bytes() != probe[1]:
                verdict.update(outcome="wrong-bytes", detail=f"read {probe[0]:#x} differs from the model")
        if command == "check" and isinstance(want, str):
            verdict.update(outcome="accepted-inconsistent", detail=f"check passed: {want}")
        return verdict
    if command == "check":
        # check prints its problems on stdout, one line each, and a summary line on stderr.
        problems = (work / "stdout").read_text(errors="replace").splitlines()
        ok = len(lines) == 1 and "Traceback" not in err.getvalue() and all(
            p.split(":", 1)[0] in ("error", "warning", "note") for p in problems)
        verdict.update(outcome="clean-error" if ok else "traceback", detail=(problems or lines or [""])[0][:200])
        return verdict
    if len(lines) == 1 and "Traceback" not in lines[0]:
        verdict.update(outcome="clean-error", detail=lines[0][:200])
    else:
        verdict.update(outcome="traceback", detail=err.getvalue()[-1500:])
    return verdict


def _in_child(fn: Any, timeout: float, mem_limit: int) -> tuple[str, Any]:
    """Run `fn()` in a forked child under an alarm and an address-space limit; ("ok", result) or a failure."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        code = 0
        try:
            # The limit is on top of what the parent already maps (the child starts as its copy).
            vsz = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vsz + mem_limit, vsz + mem_limit))
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(timeout))
            result = fn()
            data = json.dumps(result).encode()
            with os.fdopen(wfd, "wb") as w:
                w.write(data)
        except BaseException as exc:
            code = 3
            with contextlib.suppress(BaseException):
                os.write(2, f"fuzz child: {type(exc).__name__}: {exc}\n".encode()[:500])
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout + 10
    with os.fdopen(rfd, "rb") as r:
        os.set_blocking(r.fileno(), False)
        while True:
            try:
                chunk = r.read()
            except BlockingIOError:
                chunk = None
            if chunk:
                chunks.append(chunk)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                with contextlib.suppress(BlockingIOError, TypeError):
                    rest = r.read()
                    if rest:
                        chunks.append(rest)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "hang", None
            time.sleep(0.005)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return ("hang" if sig == signal.SIGALRM else "unbounded-memory" if sig in (signal.SIGKILL, signal.SIGSEGV)
                else "traceback"), f"killed by signal {sig}"
    if os.WEXITSTATUS(status) != 0:
        return "unbounded-memory", "child failed (allocation under the limit)"
    return "ok", json.loads(b"".join(chunks) or b"null")


# --- the campaign ----------------------------------------------------------------------------------------------


def preload() -> None:
    """Import what the children need once, in the parent (forks share it)."""
    from crit_pageread.cli import crit_compat, main
    from crit_pageread.criu_env import pycriu
    from crit_pageread.plugins import get_plugin_manager

    get_plugin_manager()
    main.plugin_manager()
    main.build_parser()
    crit_compat.crit_main()
    pycriu()


def _pack(top: Path, dest: Path) -> Path:
    """The mutant as a checkpoint archive (`checkpoint/` inside, as Podman writes it); FIFOs, devices and
    symlinks go in as such members (the archive reader must refuse them)."""
    import tarfile

    with tarfile.open(dest, "w") as tar:
        tar.add(top, arcname="checkpoint")
    return dest


def run(checkpoints: list[tuple[Path, str]], mutants: int, seed: int, work: Path, *, timeout: float = 30,
        mem_limit: int = 2 << 30, commands: bool = True, log: Any = None, archives: float = 0.0) -> Results:
    """`mutants` seeded mutants spread over `checkpoints` ((root directory, top directory relative to it)).

    With `archives` > 0, that share of the mutants of checkpoints without a parent chain is read as a
    `.tar` of the mutant instead of the directory."""
    preload()
    rng = random.Random(seed)
    results = Results()
    pids_of: dict[Path, list[int]] = {}
    from crit_pageread import open_images

    for root, newest in checkpoints:
        with open_images(root / newest) as images:
            pids_of[root] = [p for p in images.pids if (root / newest / f"pagemap-{p}.img").exists()]
    for n in range(mutants):
        root, top_name = checkpoints[n % len(checkpoints)]
        case = work / f"m{n}"
        clone(root, case)
        top = case / top_name
        mrng = random.Random(rng.getrandbits(64))
        desc, touched = mutate(top, mrng)
        if mrng.random() < 0.25:
            more, touched2 = mutate(top, mrng)
            desc += "; " + more
            touched |= touched2
        only_pages = touched <= {"pagemap", "pages"}
        expected = expectation(top, pids_of[root])
        if archives and mrng.random() < archives and not os.path.lexists(root / top_name / "parent"):
            top = _pack(top, case / "checkpoint.tar")
            desc += " (as a .tar)"
            # One hostile member (a FIFO, a symlink to a device) rightly makes the archive refused for every
            # pid, also those whose own pages are intact: a refusal is a clean error here.
            only_pages = False
        results.mutants += 1
        status, verdicts = _in_child(partial(_library, top, expected, only_pages), timeout, mem_limit)
        if status != "ok":
            verdicts = [{"strategy": "*", "pid": "*", "outcome": status, "detail": str(verdicts or "")}]
        for v in verdicts:
            results.library[v["outcome"]] += 1
            if v["outcome"] in NON_CLEAN:
                results.failures.append({"mutant": n, "mutation": desc, **v})
        if commands:
            command = mrng.choice(COMMANDS)
            pid = mrng.choice(pids_of[root])
            (case / "_out").mkdir()
            status, v = _in_child(partial(_command, top, pid, command, expected, case / "_out"), timeout,
                                  mem_limit)
            if status != "ok":
                v = {"command": command, "outcome": status, "detail": str(v or "")}
            results.commands[v["outcome"]] += 1
            if v["outcome"] in NON_CLEAN:
                results.failures.append({"mutant": n, "mutation": desc, **v})
        if log is not None:
            log(n, desc, verdicts, results)
        shutil.rmtree(case, ignore_errors=True)
    return results


# --- page-server requests --------------------------------------------------------------------------------------


def fuzz_server(root: Path, top: str, requests: int, seed: int, results: Results, *, deadline: float = 5.0) -> None:
    """Hostile GETs (and garbage) to `serve` on loopback; replies checked against the model, the server kept alive."""
    from crit_pageread import load_config, open_images
    from crit_pageread.pageserver.protocol import GET_REPLY_CMD, Wire
    from crit_pageread.pageserver.server import PageServer, ServeOptions

    images_dir = root / top
    with open_images(images_dir) as images:
        pids = [p for p in images.pids if (images_dir / f"pagemap-{p}.img").exists()]
    memory = {pid: model.Memory(images_dir, f"pagemap-{pid}.img").all_pages() for pid in pids}
    data_pages = {pid: sorted(v for v, p in pages.items() if p.kind == "data") for pid, pages in memory.items()}
    errors: list[str] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(f"{args.exc_type.__name__}: {args.exc_value}")
    server = PageServer(images_dir, load_config(env={}), ServeOptions(request_timeout=2.0, idle_timeout=2.0),
                        lambda line: None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    wire = Wire("4.1")
    rng = random.Random(seed)
    try:
        for _ in range(requests):
            pid = rng.choice(pids)
            vaddr = rng.choice(data_pages[pid]) if data_pages[pid] else 0x1000
            kind = rng.choice(["valid", "valid", "random-pid", "random-vaddr", "huge", "zero", "garbage", "short",
                               "flags", "unaligned"])
            nr = rng.choice([1, 2, 16, 300])
            if kind == "random-pid":
                pid = rng.choice([0, 1, 4242, (1 << 31) - 1])
            elif kind == "random-vaddr":
                vaddr = rng.randrange(0, 1 << 47) & ~0xFFF
            elif kind == "huge":
                nr = rng.choice([1 << 18 + 1, 1 << 31, (1 << 32) - 1])
            elif kind == "zero":
                nr = 0
            elif kind == "unaligned":
                vaddr += rng.randrange(1, 4096)
            payload = wire.pack_get(pid, vaddr, nr) if kind not in ("garbage", "short", "flags") else (
                bytes(rng.randrange(256) for _ in range(24)) if kind == "garbage" else
                wire.pack_get(pid, vaddr, nr)[: rng.randrange(1, 24)] if kind == "short" else
                wire.pack(7 | (rng.randrange(1, 255) << 16), nr, vaddr, pid))
            outcome = _one_request(server.port, payload, wire, memory.get(pid, {}), pid, vaddr, nr, deadline,
                                   GET_REPLY_CMD)
            results.server[outcome[0]] += 1
            if outcome[0] in NON_CLEAN:
                results.failures.append({"server_request": kind, "pid": pid, "vaddr": vaddr, "nr": nr,
                                         "outcome": outcome[0], "detail": outcome[1]})
            # The server serves the next good client whatever the last one did.
            good_pid = pids[0]
            good = data_pages[good_pid][0]
            check = _one_request(server.port, wire.pack_get(good_pid, good, 1), wire, memory[good_pid], good_pid, good,
                                 1, deadline, GET_REPLY_CMD)
            if check[0] != "exact":
                results.server["server-stuck"] += 1
                results.failures.append({"server_request": kind, "outcome": "hang", "detail": f"after it: {check}"})
                results.server["hang"] += 1
    finally:
        server.shutdown()
        thread.join(10)
        threading.excepthook = old_hook
    for e in errors:
        results.server["traceback"] += 1
        results.failures.append({"server": "thread", "outcome": "traceback", "detail": e})


def _one_request(port: int, payload: bytes, wire: Any, pages: dict[int, model.Page], pid: int, vaddr: int, nr: int,
                 deadline: float, reply_cmd: int) -> tuple[str, str]:
    valid = 0 < nr <= 1 << 18 and vaddr % 4096 == 0 and pages.get(vaddr, model.Page("hole")).kind == "data" \
        and len(payload) == wire.size and payload == wire.pack_get(pid, vaddr, nr)
    with socket.create_connection(("127.0.0.1", port), timeout=deadline) as sock:
        sock.sendall(payload)
        if len(payload) < wire.size:
            sock.shutdown(socket.SHUT_WR)
        try:
            head = _recv(sock, wire.size)
        except TimeoutError:
            return "hang", "no reply and no close within the deadline"
        if not head:
            return ("refused-consistent", "closed on a valid GET") if valid else ("clean-error", "closed")
        if len(head) < wire.size:
            return "traceback", f"half a reply header ({len(head)} bytes)"
        reply = wire.unpack(head)
        if not valid:
            return "accepted-inconsistent", f"answered an invalid request ({reply.describe()})"
        if reply.cmd != reply_cmd or reply.vaddr != vaddr or reply.dst_id != wire.unpack(payload).dst_id \
                or not 0 < reply.nr_pages <= nr:
            return "wrong-bytes", f"reply header {reply.describe()}"
        data = _recv(sock, reply.nr_pages * 4096)
        want = b"".join(pages.get(vaddr + k * 4096, model.Page("hole")).data for k in range(reply.nr_pages))
        return ("exact", "") if data == want else ("wrong-bytes", f"GET {vaddr:#x} x{reply.nr_pages} differs")


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def main(argv: list[str] | None = None) -> int:
    """`python -m fuzz.campaign --checkpoint ROOT[:TOP] ... --mutants N --seed S [--server N] [--json]`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fuzz.campaign")
    p.add_argument("--checkpoint", action="append", required=True, help="ROOT[:TOP] (TOP: the newest level)")
    p.add_argument("--mutants", type=int, default=200)
    p.add_argument("--server", type=int, default=200, help="hostile page-server requests")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-commands", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    checkpoints = []
    for spec in args.checkpoint:
        root, _, top = spec.partition(":")
        checkpoints.append((Path(root), top or "."))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crit-pageread-fuzz-") as tmp:
        results = run(checkpoints, args.mutants, args.seed, Path(tmp), commands=not args.no_commands)
        if args.server:
            fuzz_server(checkpoints[0][0], checkpoints[0][1], args.server, args.seed, results)
    summary = results.as_dict()
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["seed"] = args.seed
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"fuzz: seed {args.seed}: {results.mutants} mutants in {summary['seconds']} s")
        print(f"  library (per strategy and pid): {dict(results.library)}")
        print(f"  commands (one per mutant): {dict(results.commands)}")
        print(f"  page-server requests: {dict(results.server)}")
        print(f"  non-clean: {results.non_clean()}")
        for f in results.failures[:20]:
            print(f"  NON-CLEAN {f}")
    return 0 if results.non_clean() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
