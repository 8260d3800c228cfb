"""Process management: the master, its workers, listeners, TLS and shutdown.

The master checks the addresses, creates the shared state, forks one worker
per core (each binds its own SO_REUSEPORT sockets, so the kernel spreads
connections), then serves the admin API and runs the health checks. A worker
that dies is forked again (its requests in flight are lost, the other
workers' listeners stay up meanwhile); one that keeps dying within seconds of
its start is given up after a few tries. SIGTERM or SIGINT: workers stop
accepting, finish the requests in flight (bounded) and exit; the master
returns 0. SIGHUP to the master (or `POST /v1/tls/reload`) reloads the
certificates: the master loads them first, and only when every pair loads do
the workers' next handshakes get them (see `changeover.tls`); open
connections keep theirs.
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
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized

import uvloop
from aiohttp import web

from changeover.config import Listen, Topology
from changeover.proxy.admin import build_app
from changeover.proxy.health import HealthChecker
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


@dataclass(frozen=True)
class Listener:
    listen: Listen
    scope: int  # PUBLIC or the cluster index of a QA listener
    label: str


def listeners(topology: Topology) -> list[Listener]:
    public = topology.balancer.listen
    found = [Listener(public, PUBLIC, "public")]
    for index, cluster in enumerate(topology.clusters):
        if cluster.qa_port is not None:
            qa = Listen(host=public.host, port=cluster.qa_port)
            found.append(Listener(qa, index, f"QA {cluster.name}"))
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
    if topology.balancer.tls_cert is None:
        return None
    reloads = Reloads()
    return Tls(Certificates(topology, reloads.behind), reloads)


def run(topology: Topology, workers: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit code (2: refused to start)."""
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
    count = workers or balancer.workers
    serving = listeners(topology)
    try:
        tls = load_tls(topology)
        state_file = topology.resolve_path(balancer.state_file) if balancer.state_file else None
        shared = SharedState(sum(len(c.members) for c in topology.clusters), count)
        pool = PoolState(topology, shared, state_file)
    except (OSError, ValueError) as exc:
        print(f"changeover balancer: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    redirect = [balancer.redirect_listen] if balancer.redirect_listen else []
    problem = _address_problem([*(s.listen for s in serving), balancer.admin_listen, *redirect])
    if problem:
        print(f"changeover balancer: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def fork(index: int) -> tuple[BaseProcess, Connection]:
        """Start worker `index`; it says None on the pipe once it listens, else why not."""
        receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
        process: BaseProcess = multiprocessing.get_context("fork").Process(
            target=_worker_main,
            args=(index, topology, shared, serving, tls, send),
            name=f"changeover-worker-{index}",
            daemon=False,
        )
        process.start()
        send.close()
        return process, receive

    processes = _start_workers(fork, count)
    if isinstance(processes, str):
        print(f"changeover balancer: {processes}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_master(topology, pool, token, serving, processes, fork, tls))


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


def _worker_main(
    index: int,
    topology: Topology,
    shared: SharedState,
    serving: list[Listener],
    tls: Tls | None,
    ready: Connection,
) -> None:
    # A worker restarted by the master is forked from its running event loop: a
    # signal must not reach the master's loop through its inherited wakeup fd.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master's: it reloads, then tells us
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(_serve(index, topology, shared, serving, tls, ready))
    sys.exit(code)


async def _serve(
    index: int,
    topology: Topology,
    shared: SharedState,
    serving: list[Listener],
    tls: Tls | None,
    ready: Connection,
) -> int:
    loop = asyncio.get_running_loop()
    worker = Worker(topology, shared, index)
    servers: list[asyncio.Server] = []
    context = tls.certificates.listener if tls is not None else None
    balancer = topology.balancer
    public = balancer.listen
    factories = [
        (
            s.listen,
            client_factory(worker, s.scope, context is not None, str(s.listen)),
            context,
        )
        for s in serving
    ]
    if balancer.redirect_listen is not None:
        factory = redirect_factory(public.port, public.host, balancer.timeouts.header)
        factories.append((balancer.redirect_listen, factory, None))
    for listen, factory, ssl_context in factories:
        try:
            sock = bind(listen, reuse_port=True)
            sock.listen(BACKLOG)
        except OSError as exc:
            ready.send(f"cannot listen on {listen}: {exc.strerror or exc}")
            return EXIT_BAD_INPUT
        servers.append(
            await loop.create_server(factory, sock=sock, ssl=ssl_context, backlog=BACKLOG)
        )
    ready.send(None)
    ready.close()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    def orphaned() -> None:  # the master was killed: do not serve on alone
        if os.getppid() != parent:
            stop.set()
        else:
            loop.call_later(1.0, orphaned)

    orphaned()
    await stop.wait()
    for server in servers:
        server.close()
    worker.stop()
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            while worker.clients:
                await worker.drained.wait()
                worker.drained.clear()
    except TimeoutError:
        pass  # whatever is still open is cut by close()
    worker.close()
    return EXIT_OK


async def _master(
    topology: Topology,
    pool: PoolState,
    token: str,
    serving: list[Listener],
    processes: list[BaseProcess],
    fork: Fork,
    tls: Tls | None,
) -> int:
    loop = asyncio.get_running_loop()
    balancer = topology.balancer
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if tls is not None:

        def hangup() -> None:
            try:
                tls.reload()
            except ValueError as exc:
                log.error("certificates not reloaded, the old ones still serve: %s", exc)

        loop.add_signal_handler(signal.SIGHUP, hangup)
    alive: dict[BaseProcess, int] = {p: i for i, p in enumerate(processes)}  # -> worker index
    started = dict.fromkeys(range(len(processes)), loop.time())
    crashes = dict.fromkeys(range(len(processes)), 0)  # quick deaths in a row, per index
    all_exited = asyncio.Event()
    code = EXIT_OK

    def exited(process: BaseProcess) -> None:
        nonlocal code
        loop.remove_reader(process.sentinel)
        process.join()
        index = alive.pop(process)
        # Its requests in flight and tunnels died with it: drain waits must not count them.
        for died in (pool.shared.counters(index)[0], pool.shared.tunnels(index)):
            for member in range(len(died)):
                died[member] = 0
        if not stop.is_set():
            log.error("balancer worker %s exited with code %s", process.pid, process.exitcode)
            quick = loop.time() - started[index] < CRASH_WINDOW
            crashes[index] = crashes[index] + 1 if quick else 1
            if crashes[index] <= MAX_CRASHES:
                # Like nginx's master: the listeners stay up in the other workers
                # meanwhile, and a lone worker is back within RESPAWN_DELAY.
                loop.call_later(RESPAWN_DELAY * crashes[index], respawn, index)
                return
            log.error("balancer worker %d died %d times running: not restarted", index, MAX_CRASHES)
            if not alive:
                code = EXIT_FAILED
                stop.set()
        if not alive:
            all_exited.set()

    def respawn(index: int) -> None:
        if stop.is_set():
            if not alive:
                all_exited.set()
            return
        process, pipe = fork(index)
        started[index] = loop.time()
        alive[process] = index
        loop.add_reader(process.sentinel, exited, process)

        def said() -> None:
            loop.remove_reader(pipe.fileno())
            with contextlib.suppress(EOFError):
                problem = pipe.recv()
                if problem is None:
                    log.info("balancer worker %d restarted (pid %s)", index, process.pid)
                else:
                    log.error("balancer worker %d could not restart: %s", index, problem)
            pipe.close()

        loop.add_reader(pipe.fileno(), said)

    for process in processes:
        loop.add_reader(process.sentinel, exited, process)

    reload_tls = tls.reload if tls is not None else None
    runner = web.AppRunner(
        build_app(pool, token, reload_tls), access_log=None, handle_signals=False
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, balancer.admin_listen.host, balancer.admin_listen.port).start()
    except OSError as exc:
        log.error("cannot listen on %s (admin): %s", balancer.admin_listen, exc.strerror or exc)
        code = EXIT_BAD_INPUT
        stop.set()
    health = asyncio.create_task(HealthChecker(topology, pool).run())
    redirect_to = [balancer.redirect_listen] if balancer.redirect_listen else []
    for warning in expiry_warnings(topology, dt.datetime.now(dt.UTC)):
        log.warning("%s", warning)
    if not stop.is_set():
        log.info(
            "balancer started: %s, admin %s, %d worker%s, %s, %d members",
            ", ".join(
                [f"{s.label} {s.listen}{' (TLS)' if tls else ''}" for s in serving]
                + [f"redirect {r} to https" for r in redirect_to]
            ),
            balancer.admin_listen,
            len(processes),
            "" if len(processes) == 1 else "s",
            balancer.algorithm,
            len(pool.names),
        )
    await stop.wait()
    log.info("balancer stopping: finishing requests in flight")
    health.cancel()
    for process in list(alive):
        if process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT + 5):
            await all_exited.wait()
    except TimeoutError:
        for process in list(alive):
            process.kill()
    await runner.cleanup()
    log.info("balancer stopped")
    return code
