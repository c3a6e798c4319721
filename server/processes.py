"""``reefcap serve`` as one process, or as ``--workers N`` processes on one port kept by a supervisor.

The supervisor does no model work: each worker is a fresh interpreter (multiprocessing's spawn, never a fork
of a process that has run PyTorch, whose thread pool can hang a forked child) that loads its own models. The
supervisor reserves the port (a bound socket that never listens), makes the metrics directory fresh, starts the
workers, replaces any that dies (marking its live gauges gone) and, on SIGTERM or SIGINT, passes SIGTERM on so
each drains, then removes the directory. Each worker binds its own listening socket with ``SO_REUSEPORT``: the
kernel spreads new connections over the workers by a hash of their addresses (one shared socket let whichever
worker woke first accept a whole burst of keep-alive connections), and a worker still loading its models has no
socket, so no connection waits on it. A worker killed outright loses the requests it held; the others keep
answering, new connections go to them, and its replacement starts on the shared generation's primary.

What the workers share is described where it lives: metrics in :mod:`.metrics`, feedback in :mod:`.feedback`
(every caption answer waits for its record to be committed, so any worker takes its feedback), the served model
in :mod:`.generation`. Limits (queue, connections, large bodies) hold per worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from reefcap.models.errors import ReefcapError

from .settings import ServerSettings

log = logging.getLogger("reefcap.server")
GIVE_UP_AFTER = 5  # consecutive failed starts of one worker before the supervisor stops the server


def prepare_app(settings: ServerSettings, worker: int | None = None, shared: bool = False, metrics: Any = None) -> Any:
    """The app of one server process: its feedback store (a one-line error, before any model loads, when it
    cannot be written), the shared generation's primary (else the configured one) and the fallback, loaded;
    reporting to ``metrics`` (new :class:`Metrics` by default)."""
    from .app import Placement, create_app, open_store
    from .generation import SharedGeneration
    from .metrics import Metrics
    from .pool import build_pool

    store = open_store(settings)
    try:
        target, generation = SharedGeneration(store, settings.model).start()
        loading = settings if target == settings.model else settings.model_copy(update={"model": target})
        # The app reports to these same metrics (create_app takes them from the pool).
        pool = build_pool(loading, metrics or Metrics(), log_if_any=True)
        if not pool.ready:
            fallback = f"fallback {settings.fallback!r} ({pool.fallback_error})" if settings.fallback else "no fallback"
            raise ReefcapError(
                f"no model could be loaded: primary {target!r} ({pool.primary_error}); {fallback}. "
                "Pass --model DIR (e.g. one written by `reefcap model init --kind tiny --out DIR`)."
            )
    except BaseException:
        store.close()
        raise
    placement = Placement(worker, generation, None if target == settings.model else target, shared)
    return create_app(settings, pool, placement, store)


def serve(settings: ServerSettings) -> int:
    """Run the server the settings describe until SIGTERM or SIGINT: one process, or ``workers`` of them."""
    from .limits import run

    if settings.workers > 1:
        return Supervisor(settings).run()
    # One process shares its store only through PostgreSQL (other servers may take its feedback).
    run(prepare_app(settings, shared=bool(settings.feedback_dsn)), settings)
    return 0


def port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` with ``SO_REUSEPORT`` (every worker binds one; uvicorn listens)."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = found[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ReefcapError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return sock


def worker_settings(settings: ServerSettings) -> ServerSettings:
    """A worker's settings, with the cores divided among the workers where the settings leave it automatic:
    inference threads (each process would otherwise take every core but one), and batches in flight, one per
    worker when a worker has fewer than two cores (the processes fill the cores; two batches in each fought over
    them: 280-286 against 317-318 images/s for two workers at 32 connections on 2 vCPUs)."""
    cores = max(1, (os.cpu_count() or 1) // settings.workers)
    update: dict[str, Any] = {}
    if not settings.inference_threads:
        update["inference_threads"] = cores
    if not settings.inference_workers and cores < 2:
        update["inference_workers"] = 1
    return settings.model_copy(update=update) if update else settings


def worker_main(settings: ServerSettings, index: int, port: int, status: Connection) -> None:
    """One worker (a spawned process): load, bind, tell the supervisor, serve until SIGTERM."""
    _die_with_parent()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .limits import run

    settings = worker_settings(settings)
    try:
        app = prepare_app(settings, worker=index, shared=True)
        sock = port_socket(settings.host, port)
    except ReefcapError as exc:
        status.send(("error", str(exc)))
        sys.exit(2)
    except Exception as exc:
        log.exception("worker %d could not start", index)
        status.send(("error", f"worker {index} could not start: {type(exc).__name__}: {exc}"))
        sys.exit(3)
    run(app, settings, sockets=[sock], on_started=lambda: status.send(("ready", os.getpid())))


def _die_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM when the supervisor dies, however it dies (no orphans serving)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Starts ``settings.workers`` workers, replaces those that die, and stops them all on SIGTERM/SIGINT."""

    def __init__(self, settings: ServerSettings) -> None:
        if not sys.platform.startswith("linux"):
            raise ReefcapError("--workers above 1 needs Linux (workers share the port with SO_REUSEPORT)")
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")
        self.procs: dict[int, Any] = {}  # worker index -> process
        self.status: dict[int, Connection] = {}
        self.ready: set[int] = set()
        self.failures: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}  # worker index -> when its replacement starts (after a back-off)
        self.stopping = False

    def run(self) -> int:
        """Serve until a signal; 0 after a clean stop. A worker that cannot start at first stops the server with
        its one-line error (as one process would)."""
        reserved = port_socket(self.settings.host, self.settings.port)  # holds the port (and settles port 0)
        self.port = reserved.getsockname()[1]
        self.metrics_dir = tempfile.mkdtemp(prefix="reefcap-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir  # read by each worker as it starts
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.settings.workers):
                self._start(index)
            self._wait_ready()
            log.warning("%d workers serving on %s:%d", self.settings.workers, self.settings.host, self.port)
            while not self.stopping:
                self._watch(0.5)
            return 0
        finally:
            self._shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            reserved.close()
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _start(self, index: int) -> None:
        parent, child = self.context.Pipe(duplex=False)
        proc = self.context.Process(
            target=worker_main, args=(self.settings, index, self.port, child), name=f"reefcap-worker-{index}"
        )
        proc.start()
        child.close()
        self.procs[index], self.status[index] = proc, parent
        self.ready.discard(index)

    def _wait_ready(self) -> None:
        while len(self.ready) < self.settings.workers:
            if self.stopping:
                raise ReefcapError("stopped before every worker was ready")
            for _, message in self._messages(1.0):
                if message[0] == "error":
                    raise ReefcapError(message[1])
            for index, proc in list(self.procs.items()):
                if not proc.is_alive() and index not in self.ready:
                    raise ReefcapError(f"worker {index} exited with {proc.exitcode} while starting")

    def _messages(self, timeout: float) -> list[tuple[int, tuple]]:
        """Status messages from the workers (ready / error), waiting at most ``timeout`` for the first."""
        by_conn = {conn: index for index, conn in self.status.items()}
        # A dead worker waiting out its back-off is left out: its sentinel would wake the wait at once, every time.
        sentinels = [p.sentinel for i, p in self.procs.items() if i not in self.restart_at]
        out = []
        for conn in wait([*by_conn, *sentinels], timeout):
            index = by_conn.get(conn)
            if index is None:
                continue
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the worker is gone: its sentinel says so
                conn.close()
                del self.status[index]
                continue
            if message[0] == "ready":
                self.ready.add(index)
                self.failures[index] = 0
            out.append((index, message))
        return out

    def _watch(self, timeout: float) -> None:
        for index, message in self._messages(timeout):
            if message[0] == "error":
                log.error("worker %d could not start again: %s", index, message[1])
        for index, proc in list(self.procs.items()):
            if proc.is_alive() or self.stopping or index in self.restart_at:
                continue
            self._bury(proc)
            failed = index not in self.ready
            self.failures[index] = self.failures.get(index, 0) + 1 if failed else 0
            if self.failures[index] >= GIVE_UP_AFTER:
                log.error("worker %d failed to start %d times in a row: stopping", index, GIVE_UP_AFTER)
                self.stopping = True
                return
            log.warning("worker %d (pid %d) exited with %s: starting another", index, proc.pid, proc.exitcode)
            # A worker that failed to start waits before its next try; the watch goes on meanwhile (signals, the
            # other workers), where a sleep here held it up to 30 s.
            self.restart_at[index] = time.monotonic() + (min(30.0, 0.5 * 2 ** self.failures[index]) if failed else 0)
        for index, when in list(self.restart_at.items()):
            if time.monotonic() >= when and not self.stopping:
                del self.restart_at[index]
                self._start(index)

    def _bury(self, proc: Any) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        proc.join(0)
        mark_process_dead(proc.pid, self.metrics_dir)  # its live gauges (queue depth, models) go; counts stay

    def _shutdown(self) -> None:
        """SIGTERM to every worker (each drains), then wait; a worker still there after the drain is killed."""
        self.stopping = True
        for proc in self.procs.values():
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout_s + 10
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker pid %d did not stop after its drain: killing it", proc.pid)
                proc.kill()
                proc.join(5)
        for conn in self.status.values():
            conn.close()
