"""Bounded execution for rewards.py: worker processes forked from a warm zygote, killed and replaced
when a call overruns.

The pool's processes import their handler module by name (`rewards`, the default): this file imports
nothing of ours, and rewards.py imports it. The handler provides
  warm_up()                once, in the zygote before it forks: what every worker should find ready
  resolve(name)            imports what units named `name` run, or raises (the zygote preloads the names
                           workers resolved; a worker resolves a task's names before its clock starts)
  run_unit(kind, payload)  one unit's result line, never raising: {"value": v}, {"error": traceback}
                           or {"value": v, "malformed": why}
A unit is (kind, payload), its payload's first item the name of what it runs.
"""

import ctypes
import gc
import importlib
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

WORKER_MEMORY_BYTES = 4 << 30  # an address-space cap per worker: a runaway parse raises MemoryError, not an OOM kill
STARTUP_TIMEOUT_S = 120.0
MAX_FAILED_STARTS = 3
# Warm workers kept beyond `workers`: the unit after a kill goes to one at once. A replacement is a
# fork of the zygote (milliseconds), never a fresh interpreter importing sympy (seconds, more when busy).
SPARE_WORKERS = 1
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def zygote(control_fd: int, handler_name: str) -> None:
    """The pool's fork server. Imports the handler and warms it up once (for rewards: math-verify, its
    grammar, sympy's lazy modules), then for each message on `control_fd` (a SOCK_SEQPACKET socket):
    takes the parent's sys.path ({"path": [...]}), resolves the names it lists ({"preload": [name, ...]},
    names a worker already resolved without trouble) and forks a worker serving the socket that came
    with it. Exits when the parent's end closes."""
    handler = importlib.import_module(handler_name)
    control = socket.socket(fileno=control_fd)
    sys.stdout = sys.stderr  # nothing may write to the parent's stdout
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    handler.warm_up()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps workers the parent kills
    gc.freeze()  # a worker's garbage collector then never touches (and copies) the zygote's objects
    control.send(b'{"ready": true}')
    while True:
        message, fds, _, _ = socket.recv_fds(control, 1 << 16, 1)
        if not message:
            return
        request = json.loads(message)
        sys.path[:] = request["path"]  # the parent's, as it is now (for module:function rewards)
        for name in request.get("preload", []):
            try:
                handler.resolve(name)
            except BaseException:
                pass  # reported by the worker that runs it
        if fds and os.fork() == 0:
            try:
                control.close()
                serve(socket.socket(fileno=fds[0]), handler)
            finally:
                os._exit(0)  # a worker never returns into the zygote's loop
        for fd in fds:
            os.close(fd)


def serve(channel: socket.socket, handler) -> None:
    """Worker main loop (in a fork of the zygote): read a task per line, write one line per unit.

    Task: {"units": [[kind, [name, ...]], ...]} (for rewards: ["score", [name, completion, sample]] or
    ["check", [name, sample]]). First {"ready": true, "pid": ...}; then per task a {"loaded": [names
    resolved]} line once its names are imported, and one line per unit, in order: the handler's
    `run_unit` line, {"value": ...} or {"error": "traceback"}. The parent times each unit from the
    line before it. sys.path is the parent's, sent with the fork.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a reward's own subprocesses must be waitable
    try:  # a hung worker must not outlive the zygote (which exits with the parent)
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):
        pass  # not Linux: the parent kills its workers on close

    def send(obj: dict) -> None:
        channel.sendall((json.dumps(obj) + "\n").encode())

    send({"ready": True, "pid": os.getpid()})
    for line in channel.makefile("rb"):
        task = json.loads(line)
        loaded = []
        for name in {payload[0] for _, payload in task["units"]}:
            try:
                handler.resolve(name)  # import a module:function reward before its clock starts
                loaded.append(name)
            except BaseException:
                pass  # reported by the unit that uses it
        send({"loaded": loaded})
        for kind, payload in task["units"]:
            send(handler.run_unit(kind, payload))


@dataclass(eq=False)  # compared by identity: the pool's list holds each once
class Worker:
    channel: socket.socket
    pid: int = 0
    buf: bytes = b""
    ready: bool = False
    units: list = field(default_factory=list)  # [(unit_id, unit)] sent and not yet answered, in order
    started: float = 0.0  # when the unit in flight started
    deadline: float = 0.0  # when it times out (inf: idle)


@dataclass
class Outcome:
    value: object = 0.0
    error: Optional[str] = None
    malformed: Optional[str] = None  # run_unit said the input gave no usable answer (a reward raised Malformed)
    timeout: bool = False
    seconds: float = 0.0  # wall-clock time of the call in its worker
    replaced: bool = False  # its worker was killed (timeout) or exited, and replaced


class RewardPool:
    """Runs the units of `handler` (a module name) in `workers` processes at a time; each unit is
    bounded by `timeout_s`. For rewards.py a unit is ("score", (name, completion, sample)) or
    ("check", (name, sample)); its outcome's value is the reward, or the gold check's reason (None: fine).

    Thread-safe (one batch at a time). Units of one task run in order on one worker, so a prompt
    group's gold is parsed once; a worker that overruns a unit's deadline or exits is killed, its
    unit scores 0 as a timeout (or error) and its remaining units go to a spare at once. Workers
    are forks of a warm zygote, topped up to `workers + spares` off the caller's path.
    Counters: `restarts` (workers replaced after a timeout or exit: reward/n_worker_restarts) and
    `spawn_wait_s` (time a unit waited with a slot free and no warm worker: 0 while spares suffice).
    """

    def __init__(self, workers: int, spares: int = SPARE_WORKERS, handler: str = "rewards"):
        self.size, self.handler = max(1, workers), handler
        self.capacity = self.size + spares
        self.workers: List[Worker] = []
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.failed_starts = self.restarts = 0
        self.spawn_wait_s, self.starved_since = 0.0, None
        self.preloaded: set = set()  # names every new worker finds resolved while the zygote forks it
        self.reported: set = set()  # "<reward>_<errors|timeouts>" already printed once (rewards.score)
        self._start_zygote()

    def _start_zygote(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([here] + [p for p in sys.path if p]))
        command = f"import reward_workers; reward_workers.zygote({theirs.fileno()}, {self.handler!r})"
        self.zygote = subprocess.Popen([sys.executable, "-c", command], pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.control, self.zygote_ready = ours, False
        self.zygote_deadline = time.monotonic() + STARTUP_TIMEOUT_S
        self.selector.register(ours, selectors.EVENT_READ, None)
        if self.preloaded:
            self._send_control({"preload": sorted(self.preloaded)})
        self._top_up()

    def _send_control(self, message: dict, fds: Sequence[int] = ()) -> None:
        try:
            socket.send_fds(self.control, [json.dumps(dict(message, path=sys.path)).encode()], list(fds))
        except OSError:
            pass  # the zygote is gone: its closed socket restarts it, and its forks are asked again

    def _top_up(self) -> None:
        """Ask the zygote for workers until the pool holds `capacity` (warm or starting)."""
        while len(self.workers) < self.capacity:
            ours, theirs = socket.socketpair()
            self._send_control({}, [theirs.fileno()])
            theirs.close()  # the zygote holds its own copy while it forks
            worker = Worker(ours, deadline=time.monotonic() + STARTUP_TIMEOUT_S)
            self.workers.append(worker)
            self.selector.register(ours, selectors.EVENT_READ, worker)

    def _restart_zygote(self) -> None:
        """The zygote exited or stopped answering: start another; forks it owed are asked again.
        MAX_FAILED_STARTS in a row that never warm up is an error (the environment is broken: every
        reward would score 0)."""
        self.failed_starts = 0 if self.zygote_ready else self.failed_starts + 1
        if self.failed_starts >= MAX_FAILED_STARTS:
            raise RuntimeError(f"{MAX_FAILED_STARTS} reward workers in a row failed to start (see their stderr above)")
        self.selector.unregister(self.control)
        self.control.close()
        self.zygote.kill()
        self.zygote.wait()
        for worker in [w for w in self.workers if not w.ready]:
            self._retire(worker)
        self._start_zygote()

    def _retire(self, worker: Worker) -> None:
        self.selector.unregister(worker.channel)
        self.workers.remove(worker)
        if worker.pid:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it had exited
        worker.channel.close()

    def run(self, tasks: List[List[Tuple[str, tuple]]], timeout_s: float) -> List[List[Outcome]]:
        """Outcomes for each unit of each task. A unit is (kind, payload) for the handler's `run_unit`;
        a task's units share a worker, each gets its own `timeout_s`."""
        with self.lock:
            return self._run(tasks, timeout_s)

    def _run(self, tasks, timeout_s: float) -> List[List[Outcome]]:
        results = [[None] * len(task) for task in tasks]
        queue = [[((t, u), unit) for u, unit in enumerate(task)] for t, task in enumerate(tasks) if task]
        pending = sum(len(task) for task in tasks)
        while pending:
            self._dispatch(queue)
            deadlines = [w.deadline for w in self.workers] + [float("inf") if self.zygote_ready else self.zygote_deadline]
            wait = min(1.0, max(0.0, min(deadlines) - time.monotonic()))
            for key, _ in self.selector.select(timeout=wait):
                if key.fileobj is self.control:
                    self._read_control()
                elif key.data in self.workers:  # not retired by an earlier event of this round
                    pending -= self._read(key.data, queue, results, timeout_s)
            now = time.monotonic()
            for worker in [w for w in self.workers if w.deadline <= now]:
                if worker.ready:
                    pending -= self._replace(worker, queue, results, Outcome(timeout=True))
                elif worker in self.workers:  # a fork that never answered: the zygote is stuck
                    self._restart_zygote()
            if not self.zygote_ready and self.zygote_deadline <= now:
                self._restart_zygote()
            self._top_up()
        self._dispatch(queue)  # closes the spawn-wait clock
        return results

    def _dispatch(self, queue) -> None:
        """Hand queued tasks to warm idle workers, `size` in flight at most; clock any wait for one."""
        busy = sum(bool(w.units) for w in self.workers)
        for worker in self.workers:
            if queue and busy < self.size and worker.ready and not worker.units:
                worker.units, busy = queue.pop(0), busy + 1
                try:
                    worker.channel.sendall((json.dumps({"units": [u for _, u in worker.units]}) + "\n").encode())
                except OSError:
                    pass  # the worker died: its closed socket is handled in the read loop
                worker.started = time.monotonic()
                worker.deadline = worker.started + STARTUP_TIMEOUT_S  # until its reward modules are imported
        now, starved = time.monotonic(), bool(queue) and busy < self.size
        if starved and self.starved_since is None:
            self.starved_since = now
        elif not starved and self.starved_since is not None:
            self.spawn_wait_s, self.starved_since = self.spawn_wait_s + now - self.starved_since, None

    def _read_control(self) -> None:
        try:
            message = self.control.recv(1 << 16)
        except ConnectionResetError:
            message = b""
        if not message:
            self._restart_zygote()
        elif json.loads(message).get("ready"):
            self.zygote_ready, self.failed_starts = True, 0

    def _read(self, worker: Worker, queue, results, timeout_s: float) -> int:
        """Take what `worker` wrote; returns the number of units it settled."""
        try:
            chunk = worker.channel.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:  # it exited (a crash, os._exit in a user's reward): its unit is an error
            if worker.ready:
                return self._replace(worker, queue, results, Outcome(error="reward worker exited"))
            self._retire(worker)  # lost with its zygote, whose restart asks for it again
            return 0
        settled = 0
        *lines, worker.buf = (worker.buf + chunk).split(b"\n")
        for message in map(json.loads, lines):
            now = time.monotonic()
            if message.get("ready"):
                worker.ready, worker.pid, worker.deadline = True, message["pid"], float("inf")
                continue
            if "loaded" in message:
                self._preload(message["loaded"])
            else:
                (t, u), _ = worker.units.pop(0)
                results[t][u] = Outcome(message.get("value", 0.0), message.get("error"), message.get("malformed"),
                                        seconds=now - worker.started)  # fmt: skip
                settled += 1
            worker.started = now
            worker.deadline = now + timeout_s if worker.units else float("inf")
        return settled

    def _preload(self, names: List[str]) -> None:
        """Tell the zygote about names a worker resolved, so the next forks start with them."""
        new = set(names) - self.preloaded
        if new:
            self.preloaded |= new
            self._send_control({"preload": sorted(new)})

    def _replace(self, worker: Worker, queue, results, outcome: Outcome) -> int:
        """Kill `worker`, give its unit in flight `outcome`, re-queue the rest; returns units settled."""
        self._retire(worker)
        self.restarts += 1
        self._top_up()
        if not worker.units:
            return 0
        (t, u), _ = worker.units[0]
        outcome.seconds, outcome.replaced = time.monotonic() - worker.started, True
        results[t][u] = outcome
        if worker.units[1:]:
            queue.insert(0, worker.units[1:])
        return 1

    def close(self) -> None:
        for worker in list(self.workers):
            self._retire(worker)
        self.selector.unregister(self.control)
        self.control.close()  # the zygote exits on it
        self.zygote.kill()
        self.zygote.wait()
        self.selector.close()
