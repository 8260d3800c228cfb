"""Release commands for the sample app, as a real site has for its app servers.

    python -m changeover.demo.appctl deploy|start|stop|status --root DIR --member M
        [--host H] [--port P] [--route R] [--version V] [--startup-delay S] [--stop-timeout S]
        [--db URL]

Every subcommand accepts the same options, so one command template fits all.
Files live in DIR/M:

- deployed-version: written by `deploy` (atomically, the version stored
  literally: it is data, never run or parsed by a shell);
- app.pid, app.log: the running app's process id and its output;
- fail-start: while it exists, `start` refuses (a fault-injection hook for tests);
- unhealthy, report-version: read by the running app (see changeover.demo.app):
  /health answers 503, /version answers the file's content.

`start` is idempotent: when the process in app.pid is the app for this member
and runs the deployed version it does nothing; when it runs another version it
is stopped first. It does not wait for the app to become healthy.
`stop` is idempotent: SIGTERM, wait up to --stop-timeout, then SIGKILL. A pid
that now belongs to another program (checked by its command line) is left alone.

Exit codes:
  0  done, or nothing to do
  1  failed: start refused by fail-start, nothing deployed, another version
     deployed than --version, no --port for start, or the process did not die
  2  bad usage, or a version that is empty or holds a line break
  3  status only: not running
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

APP_MODULE = "changeover.demo.app"
OK, FAILED, USAGE, NOT_RUNNING = 0, 1, 2, 3


class Member:
    """The files of one member under the root."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.dir = root / name
        self.version_file = self.dir / "deployed-version"
        self.pid_file = self.dir / "app.pid"
        self.log_file = self.dir / "app.log"
        self.fail_start = self.dir / "fail-start"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One appctl at a time per member (two starts must not spawn twice)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".appctl.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def deployed(self) -> str | None:
        try:
            return self.version_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def process(self) -> psutil.Process | None:
        """The live app process named in app.pid, if it is still our app for this member."""
        try:
            pid = int(self.pid_file.read_text().strip())
            proc = psutil.Process(pid)
            # Nobody may reap our orphans (PID 1 is not always an init): a zombie is dead.
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            cmdline = proc.cmdline()
        except (OSError, ValueError, psutil.Error):
            return None
        if APP_MODULE in cmdline and f"--member={self.name}" in cmdline:
            return proc
        return None


def running_version(proc: psutil.Process) -> str | None:
    for arg in proc.cmdline():
        if arg.startswith("--version="):
            return arg.removeprefix("--version=")
    return None


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def deploy(member: Member, version: str) -> int:
    write_atomically(member.version_file, version)
    print(f"{member.name}: deployed {version!r}")
    return OK


def start(member: Member, args: argparse.Namespace) -> int:
    if member.fail_start.exists():
        print(f"{member.name}: start refused: {member.fail_start} exists (fault injection)")
        return FAILED
    version = member.deployed()
    if version is None:
        print(f"{member.name}: nothing deployed (run deploy first)")
        return FAILED
    if args.version is not None and args.version != version:
        print(f"{member.name}: asked to start {args.version!r} but {version!r} is deployed")
        return FAILED
    if args.port is None:
        print(f"{member.name}: start needs --port")
        return FAILED
    proc = member.process()
    if proc is not None:
        if running_version(proc) == version:
            print(f"{member.name}: already running {version!r} (pid {proc.pid})")
            return OK
        print(f"{member.name}: running {running_version(proc)!r}, stopping it first")
        if not terminate(proc, args.stop_timeout):
            print(f"{member.name}: pid {proc.pid} did not exit")
            return FAILED
    command = [
        sys.executable,
        "-m",
        APP_MODULE,
        # --opt=value keeps a value that starts with "-" from reading as an option.
        f"--host={args.host}",
        f"--port={args.port}",
        f"--member={member.name}",
        f"--route={args.route or member.name}",
        f"--version={version}",
        f"--startup-delay={args.startup_delay}",
        f"--fault-dir={member.dir}",
        *([f"--db={args.db}"] if args.db else []),
    ]
    with open(member.log_file, "ab") as log:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=member.dir,
            start_new_session=True,  # survives this command and the terminal's signals
        )
    keep_priority(child.pid)
    write_atomically(member.pid_file, f"{child.pid}\n")
    print(f"{member.name}: started {version!r} (pid {child.pid}) on {args.host}:{args.port}")
    return OK


def keep_priority(pid: int) -> None:
    """Linux autogroups share the CPU equally between sessions, whatever their
    processes' nice values: without this, 36 members (each in its own session)
    outweigh the balancer and the probe 36 to 1 on a one-box demo. The member
    keeps the priority appctl runs at (over SSH, the sshd's: the test fleets run
    it lower, as hosts that stand for other machines)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(f"{os.nice(0)}\n")


def terminate(proc: psutil.Process, timeout: float) -> bool:
    """SIGTERM, wait up to `timeout`, then SIGKILL; True once the process is gone."""
    for send, wait in ((proc.terminate, timeout), (proc.kill, 5.0)):
        with contextlib.suppress(psutil.NoSuchProcess):
            send()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(proc):
                return True
            time.sleep(0.05)
    return not _alive(proc)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(member: Member, timeout: float) -> int:
    proc = member.process()
    if proc is None:
        member.pid_file.unlink(missing_ok=True)
        print(f"{member.name}: not running")
        return OK
    if not terminate(proc, timeout):
        print(f"{member.name}: pid {proc.pid} did not exit")
        return FAILED
    member.pid_file.unlink(missing_ok=True)
    print(f"{member.name}: stopped (pid {proc.pid})")
    return OK


def status(member: Member) -> int:
    proc = member.process()
    deployed = member.deployed()
    if proc is None:
        print(f"{member.name}: stopped (deployed {deployed!r})")
        return NOT_RUNNING
    print(
        f"{member.name}: running {running_version(proc)!r} pid {proc.pid} (deployed {deployed!r})"
    )
    return OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m changeover.demo.appctl")
    parser.add_argument("action", choices=["deploy", "start", "stop", "status"])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--member", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--route")
    parser.add_argument("--version")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--stop-timeout", type=float, default=35.0)
    parser.add_argument("--db", help="start: the app's database (see the app's --db)")
    args = parser.parse_args(argv)
    if os.getsid(0) == os.getpid():
        # A session of our own (an SSH command that the login shell exec'd): its
        # autogroup holds only us, so it takes our priority, like the app's does.
        keep_priority(os.getpid())
    if os.sep in args.member or args.member in ("", ".", ".."):
        parser.error(f"--member must be a plain name, got {args.member!r}")
    member = Member(args.root, args.member)
    if args.action == "deploy":
        if not args.version or "\n" in args.version or "\r" in args.version:
            parser.error("deploy needs a --version that is not empty and has no line break")
        with member.locked():
            return deploy(member, args.version)
    with member.locked():
        if args.action == "start":
            return start(member, args)
        if args.action == "stop":
            return stop(member, args.stop_timeout)
    return status(member)


if __name__ == "__main__":
    raise SystemExit(main())
