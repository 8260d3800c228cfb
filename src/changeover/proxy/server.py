"""Process management: the master, its workers, listeners, TLS, reload, upgrade and shutdown.

The master checks the addresses, creates the shared state, binds the listening
sockets (per address one SO_REUSEPORT socket per worker slot, so the kernel
spreads connections) and forks one worker per slot on them, then serves the
admin API and runs the health checks. The sockets stay in the master: a
worker that exits closes only its copy, and the connections queue for the
next. A worker that dies is forked again (its requests in flight are lost,
the other workers keep serving); one that keeps dying within seconds of its
start is given up after a few tries. SIGTERM or SIGINT: workers stop
accepting, finish the requests in flight (bounded) and exit; the master
returns 0.

SIGHUP (or `POST /v1/reload`) re-reads the topology file: new workers take
the sockets over, the old ones finish their requests and tunnels within
`balancer.reload_grace` (SIGQUIT), and the pool's admissions carry over by
member name (`PoolState.adopt`); a file that does not load changes nothing.
`--take-over` starts a new master on the running one's sockets and state
(`handover.py`): a binary upgrade. `POST /v1/tls/reload` reloads the
certificates only: the master loads them first (in a thread), and only when
every pair loads do the workers' next handshakes get them (see
`changeover.tls`); open connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import multiprocessing
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import uvloop
from aiohttp import web

from changeover.config import ConfigError, Listen, Topology, load
from changeover.proxy.admin import build_app
from changeover.proxy.handover import (
    ASK,
    Address,
    Handed,
    HandoverError,
    control_path,
    give,
    listen_control,
    refuse,
    same_user,
    take,
    wait_ready,
)
from changeover.proxy.health import HealthChecker
from changeover.proxy.lease import Lease
from changeover.proxy.protocol import Worker, client_factory
from changeover.proxy.redirect import redirect_factory
from changeover.proxy.routing import PUBLIC
from changeover.proxy.state import PoolState, SharedState
from changeover.tls import Certificates, expiry_warnings

log = logging.getLogger("changeover.proxy")

BACKLOG = 1024
START_TIMEOUT = 10.0  # for every worker to be listening
DRAIN_TIMEOUT = 10.0  # for requests in flight at shutdown
RESPAWN_DELAY = 0.1  # before a dead worker is restarted, times its quick deaths in a row
CRASH_WINDOW = 10.0  # a worker that dies sooner than this after its start died quickly
MAX_CRASHES = 5  # quick deaths in a row after which a worker is not restarted
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


REDIRECT = -2  # scope of the plain HTTP listener that redirects to HTTPS


@dataclass(frozen=True)
class Listener:
    listen: Listen
    scope: int  # PUBLIC, the cluster index of a QA listener, or REDIRECT
    label: str


def listeners(topology: Topology) -> list[Listener]:
    balancer = topology.balancer
    public = balancer.listen
    found = [Listener(public, PUBLIC, "public")]
    for index, cluster in enumerate(topology.clusters):
        if cluster.qa_port is not None:
            qa = Listen(host=public.host, port=cluster.qa_port)
            found.append(Listener(qa, index, f"QA {cluster.name}"))
    if balancer.redirect_listen is not None:
        found.append(Listener(balancer.redirect_listen, REDIRECT, "redirect"))
    return found


def bind(listen: Listen, reuse_port: bool) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _address_problem(addresses: list[Listen]) -> str | None:
    """Refuse to share a port with anything already listening (SO_REUSEPORT would)."""
    for listen in addresses:
        try:
            bind(listen, reuse_port=False).close()
        except OSError as exc:
            return f"cannot listen on {listen}: {exc.strerror or exc}"
    return None


def _key(listen: Listen) -> Address:
    return (listen.host, listen.port)


class Sockets:
    """The master's listening sockets: per address, one SO_REUSEPORT socket per
    worker slot, listening from the start. They live in the master, so a worker
    that exits (a reload, a crash) closes only its copy: connections queue in the
    backlog until the worker of that slot that follows accepts them, and none is
    refused. A reload's new workers and an upgrade's new master get these same
    sockets."""

    def __init__(self, slots: int, handed: dict[Address, list[socket.socket]] | None = None):
        self.slots = slots
        self.by_address: dict[Address, list[socket.socket]] = dict(handed or {})

    def missing(self, wanted: list[Listen]) -> list[Listen]:
        return [listen for listen in wanted if _key(listen) not in self.by_address]

    def open(self, wanted: list[Listen]) -> None:
        """Bind what is missing (OSError: nothing new is kept); a handed-over group
        short of slots gets more sockets in the same SO_REUSEPORT group."""
        made: list[socket.socket] = []
        try:
            for listen in wanted:
                group = self.by_address.setdefault(_key(listen), [])
                while len(group) < self.slots:
                    sock = bind(listen, reuse_port=True)
                    made.append(sock)
                    sock.listen(BACKLOG)
                    group.append(sock)
        except BaseException:
            for sock in made:
                sock.close()
            self.by_address = {
                k: [s for s in g if s not in made] for k, g in self.by_address.items()
            }
            self.by_address = {k: g for k, g in self.by_address.items() if g}
            raise

    def get(self, listen: Listen, slot: int) -> socket.socket:
        return self.by_address[_key(listen)][slot]

    def named(self, wanted: list[Listen]) -> list[tuple[Address, socket.socket]]:
        return [(_key(listen), sock) for listen in wanted for sock in self.by_address[_key(listen)]]

    def keep_only(self, wanted: list[Listen]) -> None:
        """Close the addresses no generation of workers serves any more."""
        keep = {_key(listen) for listen in wanted}
        for address in [a for a in self.by_address if a not in keep]:
            for sock in self.by_address.pop(address):
                sock.close()


class Reloads:
    """How many certificate reloads the master has made, in memory every worker
    shares: a worker whose count is behind loads the certificates again."""

    def __init__(self) -> None:
        self.count: Synchronized[int] = multiprocessing.get_context("fork").Value("Q", 0)
        self.seen = 0

    def made(self) -> None:
        with self.count.get_lock():
            self.count.value += 1
        self.seen = self.count.value

    def behind(self) -> bool:
        now = self.count.value
        if now == self.seen:
            return False
        self.seen = now
        return True


@dataclass
class Tls:
    """The certificates of this process and the master's reload count."""

    certificates: Certificates
    reloads: Reloads

    def reload(self) -> list[str]:
        """Master: load every pair again (ValueError, the old ones kept, if one fails)."""
        files = self.certificates.reload()
        self.reloads.made()
        log.info("certificates reloaded: %s", ", ".join(files))
        return files


def load_tls(topology: Topology) -> Tls | None:
    """The certificates, read from their files (blocking: off the master's loop)."""
    if topology.balancer.tls_cert is None:
        return None
    reloads = Reloads()
    return Tls(Certificates(topology, reloads.behind), reloads)


@dataclass
class Generation:
    """The workers of one topology: the first, then one per successful reload."""

    number: int
    topology: Topology
    shared: SharedState
    serving: list[Listener]
    tls: Tls | None


class ReloadError(Exception):
    """A reload refused; the old topology still serves."""


def run(topology: Topology, workers: int | None = None, take_over: bool = False) -> int:
    """Serve until SIGTERM/SIGINT (or until a new master took over); return the
    exit code (2: refused to start). `take_over`: take the listeners and state
    of the running master (see `handover.py`) instead of binding them."""
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
    balancer = topology.balancer
    token = balancer.token()
    if not token:
        print(
            f"changeover balancer: no admin token: set {balancer.admin_token_env} "
            "or balancer.admin_token",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    slots = workers or balancer.workers
    handed: Handed | None = None
    if take_over:
        try:
            handed = take(control_path(topology), START_TIMEOUT)
        except HandoverError as exc:
            print(f"changeover balancer: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        slots = max([slots, *(len(group) for group in handed.sockets.values())])
    code = _start(topology, token, slots, handed)
    if handed is not None and code == EXIT_BAD_INPUT:
        handed.close()  # the old master takes its admin API back and serves on
    return code


def _start(topology: Topology, token: str, slots: int, handed: Handed | None) -> int:
    balancer = topology.balancer
    serving = listeners(topology)
    fresh: set[int] | None = None
    try:
        tls = load_tls(topology)
        state_file = topology.resolve_path(balancer.state_file) if balancer.state_file else None
        shared = SharedState(sum(len(c.members) for c in topology.clusters), slots)
        pool = PoolState(topology, shared, state_file)
        if handed is not None:
            running = [
                (SharedState(int(d["members"]), int(d["workers"]), fd), d)
                for fd, d in handed.running
            ]
            fresh = pool.restore(handed.state, running)
    except (OSError, ValueError) as exc:
        print(f"changeover balancer: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sockets = Sockets(slots, handed.sockets if handed else None)
    wanted = [s.listen for s in serving]
    new = sockets.missing(wanted) + ([] if handed else [balancer.admin_listen])
    problem = _address_problem(new)
    if problem is None:
        try:
            sockets.open(wanted)
            admin = handed.admin if handed else bind(balancer.admin_listen, reuse_port=False)
            admin.listen(BACKLOG)
        except OSError as exc:
            problem = f"cannot listen: {exc.strerror or exc}"
    if problem:
        print(f"changeover balancer: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if handed is not None:
        sockets.keep_only(wanted)  # the old master's listeners this config no longer has
    master = Master(topology, pool, token, sockets, admin, handed)
    generation = Generation(0, topology, shared, serving, tls)
    processes = _start_workers(lambda i: master.fork(generation, i), slots)
    if isinstance(processes, str):
        print(f"changeover balancer: {processes}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(master.main(generation, processes, fresh))


Fork = Callable[[int], tuple[BaseProcess, Connection]]


def _start_workers(fork: Fork, count: int) -> list[BaseProcess] | str:
    """Fork the workers (before the master has an event loop); an error message if one fails."""
    processes: list[BaseProcess] = []
    pipes: list[Connection] = []
    for index in range(count):
        process, receive = fork(index)
        processes.append(process)
        pipes.append(receive)
    problem = None
    waiting = list(pipes)
    while waiting and problem is None:
        ready = wait(waiting, timeout=START_TIMEOUT)
        if not ready:
            problem = f"workers did not start within {START_TIMEOUT:g}s"
        for pipe in ready:
            assert isinstance(pipe, Connection)
            waiting.remove(pipe)
            try:
                message = pipe.recv()
            except EOFError:
                message = "a worker exited while starting"
            problem = problem or message
    for pipe in pipes:
        pipe.close()
    if problem is not None:
        for process in processes:
            process.terminate()
            process.join(5)
        return str(problem)
    return processes


def _drop_inherited_connections() -> None:
    """A worker forked from the master's running loop (a restart, a reload)
    inherits the master's open connections (admin clients, health checks,
    a take-over): its copy would keep one open after the master closed it, and
    a client sending on it again would wait for an answer that never comes.
    Each connected socket is pointed at /dev/null instead (the number stays
    taken, so an object still holding it cannot close something else later);
    listening sockets are kept."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for name in names:
            fd = int(name)
            try:
                if fd == devnull or not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                with socket.socket(fileno=os.dup(fd)) as probe:
                    listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            except OSError:
                continue
            if not listening:
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _worker_main(
    index: int,
    topology: Topology,
    shared: SharedState,
    serving: list[tuple[Listener, socket.socket]],
    tls: Tls | None,
    ready: Connection,
) -> None:
    # A worker restarted by the master is forked from its running event loop: a
    # signal must not reach the master's loop through its inherited wakeup fd.
    signal.set_wakeup_fd(-1)
    _drop_inherited_connections()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master's: it reloads, then tells us
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(_serve(index, topology, shared, serving, tls, ready))
    sys.exit(code)


async def _serve(
    index: int,
    topology: Topology,
    shared: SharedState,
    serving: list[tuple[Listener, socket.socket]],
    tls: Tls | None,
    ready: Connection,
) -> int:
    """Accept on the master's sockets of slot `index`. SIGTERM: stop now (idle
    connections close, requests in flight get DRAIN_TIMEOUT). SIGQUIT (a reload
    or an upgrade replaced this worker): stop accepting, let every connection
    finish its requests and tunnels for up to `balancer.reload_grace`, then stop."""
    loop = asyncio.get_running_loop()
    worker = Worker(topology, shared, index)
    servers: list[asyncio.Server] = []
    context = tls.certificates.listener if tls is not None else None
    balancer = topology.balancer
    public = balancer.listen
    try:
        for listener, sock in serving:
            if listener.scope == REDIRECT:
                factory = redirect_factory(public.port, public.host, balancer.timeouts.header)
                ssl_context = None
            else:
                factory = client_factory(
                    worker, listener.scope, context is not None, str(listener.listen)
                )
                ssl_context = context
            # A handshake is bounded like a request head (slowloris).
            handshake = balancer.timeouts.header if ssl_context else None
            servers.append(
                await loop.create_server(
                    factory,
                    sock=sock,
                    ssl=ssl_context,
                    backlog=BACKLOG,
                    ssl_handshake_timeout=handshake,
                )
            )
    except OSError as exc:
        ready.send(f"cannot serve: {exc.strerror or exc}")
        return EXIT_BAD_INPUT
    ready.send(None)
    ready.close()

    stop, retire = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGQUIT, retire.set)
    parent = os.getppid()

    def orphaned() -> None:  # the master was killed: do not serve on alone
        if os.getppid() != parent:
            stop.set()
        else:
            loop.call_later(1.0, orphaned)

    orphaned()
    ended = asyncio.ensure_future(stop.wait())
    await asyncio.wait([ended, asyncio.ensure_future(retire.wait())], return_when="FIRST_COMPLETED")
    for server in servers:
        server.close()  # this process's copy only: the master's socket listens on
    if retire.is_set() and not stop.is_set():
        worker.retire()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(balancer.reload_grace):
                await _drained(worker, ended)
    worker.stop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await _drained(worker, None)
    ended.cancel()
    worker.close()  # whatever is still open is cut
    return EXIT_OK


async def _drained(worker: Worker, cut: asyncio.Future[Any] | None) -> None:
    """Until the worker has no client left, handshaking ones included (or `cut`
    is done)."""
    while (worker.clients or worker.handshaking) and not (cut is not None and cut.done()):
        waiter = asyncio.ensure_future(worker.drained.wait())
        others = [cut] if cut is not None else []
        await asyncio.wait([waiter, *others], return_when="FIRST_COMPLETED")
        waiter.cancel()
        worker.drained.clear()


def _join(processes: list[BaseProcess]) -> None:
    for process in processes:
        process.join(5)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


class Master:
    """The master's event loop: workers of one generation or more, the admin API,
    health checks, reloads (SIGHUP, POST /v1/reload) and hand-overs."""

    def __init__(
        self,
        topology: Topology,
        pool: PoolState,
        token: str,
        sockets: Sockets,
        admin: socket.socket,
        handed: Handed | None,
    ) -> None:
        self.config = topology.source
        self.pool = pool
        self.token = token
        self.sockets = sockets
        self.admin = admin
        self.handed = handed
        self.lease: list[Lease | None] = [None]
        if handed is not None and isinstance(handed.state.get("lease"), dict):
            held = handed.state["lease"]
            self.lease[0] = Lease(str(held["owner"]), str(held["holder"]), float(held["expires"]))
        self.current: Generation | None = None
        self.alive: dict[BaseProcess, tuple[Generation, int]] = {}
        # reloads: those done; attempts: those tried, refused ones included.
        self.status: dict[str, Any] = {
            "reloads": 0, "attempts": 0, "ok": None, "error": None, "at": None,
        }  # fmt: skip
        self.reloading = asyncio.Lock()
        self.handed_over = False
        self.tasks: set[asyncio.Future[None]] = set()
        # The taken-over master's states whose workers still ran (see predecessor_exited).
        self.inherited = [r.shared for r in pool.retired]

    def fork(self, generation: Generation, index: int) -> tuple[BaseProcess, Connection]:
        """Start worker `index`; it says None on the pipe once it listens, else why not."""
        receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
        serving = [(s, self.sockets.get(s.listen, index)) for s in generation.serving]
        process: BaseProcess = multiprocessing.get_context("fork").Process(
            target=_worker_main,
            args=(index, generation.topology, generation.shared, serving, generation.tls, send),
            name=f"changeover-worker-{index}",
            daemon=False,
        )
        process.start()
        send.close()
        return process, receive

    @property
    def topology(self) -> Topology:
        assert self.current is not None
        return self.current.topology

    async def main(
        self, generation: Generation, processes: list[BaseProcess], fresh: set[int] | None
    ) -> int:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.current = generation
        balancer = generation.topology.balancer
        self.stop = stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.hangup)
        self.started = dict.fromkeys(range(len(processes)), loop.time())
        self.crashes = dict.fromkeys(range(len(processes)), 0)  # quick deaths in a row
        self.all_exited = asyncio.Event()
        self.code = EXIT_OK
        for index, process in enumerate(processes):
            self.watch(process, generation, index)

        reload_tls = self.reload_tls if generation.tls is not None else None
        app = build_app(
            self.pool, self.token, reload_tls, reload=self.reload, status=self.reload_status,
            held_lease=self.lease,
        )  # fmt: skip
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        self.site: web.SockSite | None = web.SockSite(self.runner, self.admin.dup())
        await self.site.start()
        checker = HealthChecker(generation.topology, self.pool, fresh)
        self.health = asyncio.create_task(checker.run())
        if self.handed is not None:
            self.handed.ready()
            log.info("took the listeners and the pool state over from the running balancer")
            # Its end of the connection closes as it exits, its workers gone.
            loop.add_reader(self.handed.conn.fileno(), self.predecessor_exited)
        control = self.listen_control()
        await self.warn_expiry(generation.topology)
        log.info(
            "balancer started: %s, admin %s, %d worker%s, %s, %d members",
            ", ".join(self.describe(generation)),
            balancer.admin_listen,
            len(processes),
            "" if len(processes) == 1 else "s",
            balancer.algorithm,
            len(self.pool.names),
        )
        await stop.wait()
        if control is not None:
            control.cancel()
        self.health.cancel()
        if self.handed_over:
            log.info("balancer handed over: the old workers finish their requests")
            grace = self.topology.balancer.reload_grace
            self.signal_workers(signal.SIGQUIT)
        else:
            log.info("balancer stopping: finishing requests in flight")
            grace = 0.0
            self.signal_workers(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace + DRAIN_TIMEOUT + 5):
                if self.alive:
                    await self.all_exited.wait()
        except TimeoutError:
            for process in list(self.alive):
                process.kill()
        await self.runner.cleanup()
        self.unlink_control()
        log.info("balancer stopped")
        return self.code

    async def warn_expiry(self, topology: Topology) -> None:
        """Log certificates that expire soon (their files read off the loop)."""
        now = dt.datetime.now(dt.UTC)
        for warning in await asyncio.to_thread(lambda: list(expiry_warnings(topology, now))):
            log.warning("%s", warning)

    def describe(self, generation: Generation) -> list[str]:
        tls = " (TLS)" if generation.tls else ""
        return [
            f"redirect {s.listen} to https" if s.scope == REDIRECT else f"{s.label} {s.listen}{tls}"
            for s in generation.serving
        ]

    def signal_workers(self, sig: signal.Signals, generation: Generation | None = None) -> None:
        for process, (gen, _) in list(self.alive.items()):
            if process.pid is not None and (generation is None or gen is generation):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    # --- workers ------------------------------------------------------------------

    def watch(self, process: BaseProcess, generation: Generation, index: int) -> None:
        self.alive[process] = (generation, index)
        self.loop.add_reader(process.sentinel, self.exited, process)

    def exited(self, process: BaseProcess) -> None:
        loop = self.loop
        loop.remove_reader(process.sentinel)
        process.join()
        generation, index = self.alive.pop(process)
        # Its requests in flight and tunnels died with it: drain waits must not count them.
        shared = generation.shared
        for died in (shared.counters(index)[0], shared.tunnels(index)):
            for member in range(len(died)):
                died[member] = 0
        if generation is not self.current:  # an old worker done after a reload
            if not any(gen is generation for gen, _ in self.alive.values()):
                self.pool.retire_done(generation.shared)
                self.close_unused()
                log.info("the workers replaced by reload %d have exited", generation.number + 1)
        elif not self.stop.is_set():
            log.error("balancer worker %s exited with code %s", process.pid, process.exitcode)
            quick = loop.time() - self.started[index] < CRASH_WINDOW
            self.crashes[index] = self.crashes[index] + 1 if quick else 1
            if self.crashes[index] <= MAX_CRASHES:
                # Like nginx's master: the listeners stay up in the other workers
                # meanwhile, and a lone worker is back within RESPAWN_DELAY.
                delay = RESPAWN_DELAY * self.crashes[index]
                loop.call_later(delay, self.respawn, generation, index)
                return
            log.error("balancer worker %d died %d times running: not restarted", index, MAX_CRASHES)
            if not any(gen is generation for gen, _ in self.alive.values()):
                self.code = EXIT_FAILED
                self.stop.set()
        if not self.alive and self.stop.is_set():
            self.all_exited.set()

    def close_unused(self) -> None:
        generations = {id(g): g for g, _ in self.alive.values()}
        if self.current is not None:
            generations[id(self.current)] = self.current
        self.sockets.keep_only([s.listen for g in generations.values() for s in g.serving])

    def respawn(self, generation: Generation, index: int) -> None:
        if self.stop.is_set() or generation is not self.current:
            if not self.alive and self.stop.is_set():
                self.all_exited.set()
            return
        process, pipe = self.fork(generation, index)
        self.started[index] = self.loop.time()
        self.watch(process, generation, index)

        def said() -> None:
            self.loop.remove_reader(pipe.fileno())
            with contextlib.suppress(EOFError):
                problem = pipe.recv()
                if problem is None:
                    log.info("balancer worker %d restarted (pid %s)", index, process.pid)
                else:
                    log.error("balancer worker %d could not restart: %s", index, problem)
            pipe.close()

        self.loop.add_reader(pipe.fileno(), said)

    async def start_generation(self, generation: Generation) -> list[BaseProcess]:
        """Fork every worker of `generation` and wait until each serves (ReloadError)."""
        started = [self.fork(generation, index) for index in range(self.sockets.slots)]
        problem: str | None = None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                for _, pipe in started:
                    said = asyncio.Event()
                    self.loop.add_reader(pipe.fileno(), said.set)
                    try:
                        await said.wait()
                    finally:
                        self.loop.remove_reader(pipe.fileno())
                    try:
                        problem = problem or pipe.recv()
                    except EOFError:
                        problem = problem or "a new worker exited while starting"
        except TimeoutError:
            problem = f"the new workers did not start within {START_TIMEOUT:g}s"
        for _, pipe in started:
            pipe.close()
        if problem is not None:
            for process, _ in started:
                process.kill()
            await asyncio.to_thread(_join, [p for p, _ in started])
            raise ReloadError(str(problem))
        return [process for process, _ in started]

    # --- reloads ------------------------------------------------------------------

    def hangup(self) -> None:
        async def reload() -> None:
            with contextlib.suppress(ReloadError):
                await self.reload()

        task = asyncio.ensure_future(reload())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def reload_status(self) -> dict[str, Any]:
        return dict(self.status)

    async def reload(self) -> dict[str, Any]:
        """Re-read the topology file and move the listeners to new workers
        (ReloadError, logged on one line, if the old topology serves on)."""
        async with self.reloading:
            if self.stop.is_set():
                raise ReloadError("the balancer is stopping")
            when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            tried = {"reloads": self.status["reloads"], "attempts": self.status["attempts"] + 1}
            try:
                changes = await self._reload()
            except ReloadError as exc:
                message = _one_line(str(exc))
                self.status = tried | {"ok": False, "error": message, "at": when}
                log.error("reload failed, the old topology still serves: %s", message)
                raise ReloadError(message) from None
            self.status = tried | {
                "reloads": tried["reloads"] + 1, "ok": True, "error": None, "at": when,
                "members": changes,
            }  # fmt: skip
            return self.reload_status()

    async def _reload(self) -> list[str]:
        old = self.current
        assert old is not None
        if self.config is None:
            raise ReloadError("the balancer was not started from a topology file")
        try:
            topology = await asyncio.to_thread(load, self.config)
        except ConfigError as exc:
            raise ReloadError(str(exc)) from None
        balancer, was = topology.balancer, old.topology.balancer
        if balancer.admin_listen != was.admin_listen:
            raise ReloadError(
                f"{self.config}: balancer.admin_listen changed ({was.admin_listen} -> "
                f"{balancer.admin_listen}): that takes a restart with --take-over"
            )
        if balancer.workers != was.workers and balancer.workers != self.sockets.slots:
            log.warning(
                "balancer.workers changed to %d: a reload keeps %d workers, "
                "a restart with --take-over applies it", balancer.workers, self.sockets.slots,
            )  # fmt: skip
        try:
            tls = await asyncio.to_thread(load_tls, topology)
        except ValueError as exc:
            why = f"certificates not reloaded, the old ones still serve: {exc}"
            raise ReloadError(why) from None
        serving = listeners(topology)
        new = self.sockets.missing([s.listen for s in serving])
        problem = await asyncio.to_thread(_address_problem, new)
        if problem:
            raise ReloadError(problem)
        try:
            self.sockets.open([s.listen for s in serving])
        except OSError as exc:
            raise ReloadError(f"cannot listen: {exc.strerror or exc}") from None
        shared = SharedState(sum(len(c.members) for c in topology.clusters), self.sockets.slots)
        shared.publish(*self.pool.picture(topology))
        generation = Generation(old.number + 1, topology, shared, serving, tls)
        try:
            processes = await self.start_generation(generation)
        except ReloadError:
            self.close_unused()
            raise
        self.current = generation
        for index, process in enumerate(processes):
            self.watch(process, generation, index)
            self.started[index] = self.loop.time()
            self.crashes[index] = 0
        changes = self.pool.adopt(topology, shared)
        await self.warn_expiry(topology)
        self.health.cancel()
        checker = HealthChecker(topology, self.pool, set(self.pool.unchecked))
        self.health = asyncio.create_task(checker.run())
        self.signal_workers(signal.SIGQUIT, old)
        grace = old.topology.balancer.reload_grace
        self.loop.call_later(grace + DRAIN_TIMEOUT + 5, self.cut, old)
        log.info(
            "reloaded %s: %d new worker%s serve %s, %s; the old ones finish their "
            "requests (at most %gs)",
            self.config, len(processes), "" if len(processes) == 1 else "s",
            ", ".join(self.describe(generation)),
            "members " + " ".join(changes) if changes else "the same members",
            grace,
        )  # fmt: skip
        return changes

    def cut(self, generation: Generation) -> None:
        """Old workers still running long after their grace: killed."""
        for process, (gen, _) in list(self.alive.items()):
            if gen is generation:
                log.error("worker %s of an old topology still ran: killed", process.pid)
                process.kill()

    async def reload_tls(self) -> list[str]:
        """POST /v1/tls/reload: the current workers' certificates, read off the loop."""
        assert self.current is not None and self.current.tls is not None
        return await asyncio.to_thread(self.current.tls.reload)

    # --- hand-over (binary upgrade) -------------------------------------------------

    def predecessor_exited(self) -> None:
        """The master taken over from has exited: its workers' figures are final."""
        assert self.handed is not None
        conn = self.handed.conn
        self.loop.remove_reader(conn.fileno())
        conn.close()
        for shared in self.inherited:
            self.pool.retire_done(shared)
        if self.inherited:
            log.info("the workers of the balancer taken over from have exited")
        self.inherited = []

    def listen_control(self) -> asyncio.Task[None] | None:
        path = control_path(self.topology)
        try:
            self.control = listen_control(path)
        except OSError as exc:
            log.warning("no take-over possible: cannot listen on %s: %s", path, exc.strerror or exc)
            return None
        self.control_path, self.control_inode = path, os.stat(path).st_ino
        self.control.setblocking(False)
        return asyncio.create_task(self.serve_control())

    def unlink_control(self) -> None:
        """Remove the control socket's file unless a new master has made its own."""
        if getattr(self, "control", None) is None:
            return
        self.control.close()
        with contextlib.suppress(OSError):
            if os.stat(self.control_path).st_ino == self.control_inode:
                self.control_path.unlink()

    async def serve_control(self) -> None:
        while True:
            conn, _ = await self.loop.sock_accept(self.control)
            handed = False
            try:
                conn.setblocking(True)
                conn.settimeout(START_TIMEOUT)
                handed = await self.hand_over(conn)
            except OSError as exc:
                log.error("take-over refused: %s", exc.strerror or exc)
            finally:
                if not handed:
                    conn.close()
            if handed:
                # Left open: it closes as this process exits, which tells the
                # new master that these workers are gone.
                self.successor = conn
                return

    async def hand_over(self, conn: socket.socket) -> bool:
        if not same_user(conn):
            log.error("take-over refused: the asking process runs as another user")
            return False
        if await asyncio.to_thread(conn.recv, 64) != ASK:
            return False
        if self.inherited:
            # Only this master learns when its predecessor's workers exit (its
            # control connection closes): a successor would stop counting them.
            why = "the workers of the balancer it took over from still finish; try again later"
            log.error("take-over refused: %s", why)
            await asyncio.to_thread(refuse, conn, why)
            return False
        async with self.reloading:  # no reload while handing over
            assert self.current is not None and self.site is not None
            await self.site.stop()  # the admin API pauses: its socket still listens
            if self.runner.server is not None:  # admin requests under way end first
                await self.runner.server.shutdown(5.0)
            self.site = None
            state = self.pool.handover_state()
            held = self.lease[0]
            if held is not None:
                state["lease"] = {
                    "owner": held.owner, "holder": held.holder, "expires": held.expires,
                }  # fmt: skip
            named = self.sockets.named([s.listen for s in self.current.serving])
            running = [(shared.fd, described) for shared, described in self.pool.live_states()]
            try:
                await asyncio.to_thread(give, conn, named, self.admin, state, running)
                conn.settimeout(START_TIMEOUT * 2 + 10)
                ok = await asyncio.to_thread(wait_ready, conn)
            except OSError:
                ok = False
            if not ok:
                log.error("the new balancer did not take over: this one serves on")
                self.site = web.SockSite(self.runner, self.admin.dup())
                await self.site.start()
                return False
            self.handed_over = True
            self.stop.set()
            return True
