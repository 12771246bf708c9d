"""Certification spread over Ray workers, with the same results file as a local run.

``smoothcert certify --workers N`` starts a local Ray with ``N`` worker actors (``--ray-address ADDR`` joins an
existing cluster instead). Each actor builds the base classifier, the data set and the method once, then takes
batches of dataset indices and returns what :meth:`~smoothcert.methods.base.CertifyMethod.propose` gives for them.
The driver alone writes the resumable TSV, in dataset order: batches that come back early wait until every earlier
one is written, and the driver runs :meth:`~smoothcert.methods.base.CertifyMethod.finish` on them in that order.

**Same numbers.** An input's random numbers derive from the run seed and its dataset index, and the number of its
samples per forward pass (``RunContext.block``) is fixed for the run, so a worker computes for an input exactly
what a local run computes: a distributed run equals a local one row for row (every column but ``time``).

**Hand-out** (:class:`HandOut`). Batches leave one shared queue in dataset order; each worker holds up to
:data:`IN_FLIGHT` (one running, the next waiting), and a batch still waiting behind a running one moves to a worker
that became idle, so no worker idles while work is left. The driver records the move in a small ledger actor
(:class:`Claims`) before it hands the batch out again, and a worker asks the ledger before it starts a batch, so
the worker the batch waited on skips it (had it already started, its copy runs to the end and is never read; rows
are a function of their inputs, so either copy is the same). Ray's own cancel of a queued actor task was seen not
to take effect under load, so the skip does not rely on it.

**Memory.** Memory-based certification is sequential by definition (seed 000 Algorithm 1): the data-dependent
methods optimize and certify each input's noise on the workers (``propose``), and the driver passes the
certificates through the memory in dataset order (``finish``), so the memory is the local run's.

**Addresses.** Without ``--ray-address`` the local Ray's services listen on 127.0.0.1 only (Ray's single-machine
mode, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and usage statistics are off (``RAY_USAGE_STATS_ENABLED=0``), unless
the environment says otherwise.

**Failures.** A worker process that dies is restarted and its batch is retried (Ray's actor restarts); a worker
that raises stops the run with that error, and the file keeps every row written so far (run the same command
again to resume). Kill the driver and rerun: the file is resumed like a local run's.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from smoothcert.cli.runner import RUNNER_COLUMNS, ResultsFile, batch_rows, resume_point
from smoothcert.methods.base import CertifyMethod, RunContext
from smoothcert.progress import progress as progress_reporter
from smoothcert.validation import check_count, check_number, check_positive

__all__ = ["check_distributed", "connect", "run_distributed", "HandOut", "Claims", "IN_FLIGHT"]

#: Batches queued per worker, so a worker never waits for the driver between batches; at most ``2 IN_FLIGHT
#: workers`` batches are handed out ahead of the next one to write.
IN_FLIGHT = 2
#: Seconds to wait for a cluster's address to answer before giving up.
CONNECT_TIMEOUT = 5.0

#: ``factory() -> (method, ctx, inputs)``: what a worker builds once (a picklable callable).
Factory = Callable[[], tuple[CertifyMethod, RunContext, Callable]]


def check_distributed(workers: int | None, address: str | None, cpus: float = 1.0, gpus: float = 0.0) -> None:
    """Check ``--workers``, ``--ray-address``, ``--worker-cpus`` and ``--worker-gpus`` before anything runs: a
    count >= 1, a ``HOST:PORT`` that answers within :data:`CONNECT_TIMEOUT` seconds, resources > 0 (GPUs >= 0),
    and Ray installed."""
    if workers is not None:
        check_count("workers (--workers)", workers)
    check_positive("worker CPUs (--worker-cpus)", cpus)
    check_number("worker GPUs (--worker-gpus)", gpus, low=0.0)
    if workers is None and address is None:
        return
    if address is None:  # a local Ray for this run only: its services listen on 127.0.0.1 alone
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("--workers and --ray-address need Ray: pip install 'smoothcert[ray]'") from None
    if address is not None:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--ray-address must be HOST:PORT (the cluster's GCS address), got {address!r}")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
        except OSError as e:
            raise ValueError(f"cannot reach a Ray cluster at {address} within {CONNECT_TIMEOUT:g} s ({e}); "
                             "start one with `ray start --head` or leave out --ray-address") from None


def connect(workers: int, address: str | None, cpus_per_worker: float) -> bool:
    """Join the cluster at ``address``, or start a local Ray for ``workers`` actors on 127.0.0.1; returns True
    when this call started or joined Ray (and the caller shuts it down), False when Ray was already running."""
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=False)
    else:
        # Local workers inherit this process's environment: make the package importable by absolute path.
        package_root = str(Path(__file__).resolve().parents[2])
        paths = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(os.path.abspath(p) for p in paths))
        ray.init(address="local", num_cpus=max(1, round(workers * cpus_per_worker)), include_dashboard=False,
                 log_to_driver=False)
    return True


class HandOut:
    """Which batch each of ``workers`` workers computes next: one shared queue of ``batches`` batches, read ahead.

    A worker holds up to ``depth`` batches (the oldest one running, the others waiting in its queue), so it never
    waits for the driver between two batches; fresh batches go out in dataset order, at most ``window`` ahead of
    the next one to write. A batch handed to a worker is not bound to it: when a worker is idle and no fresh batch
    may go out (none left, or the window is full), it takes over the earliest batch that waits behind a running
    one on another worker, and the caller withdraws it there (:class:`Claims`). So no worker idles while a batch
    waits, and with few large batches the run ends when the last batch ends, not when one worker's queue drains."""

    def __init__(self, batches: int, workers: int, *, depth: int = IN_FLIGHT, window: int | None = None):
        check_count("batches", batches)
        check_count("workers", workers)
        check_count("depth", depth)
        self.batches, self.depth = batches, depth
        self.window = window if window is not None else 2 * depth * workers
        self.queues: list[list[int]] = [[] for _ in range(workers)]
        self.fresh = 0  # the first batch never handed out
        self.written = 0  # the next batch to write (the caller advances it)

    def take(self, worker: int) -> tuple[int, int | None] | None:
        """The next batch for a free slot of ``worker`` and the worker it is taken from (``None`` for a fresh
        batch), or ``None`` when ``worker`` gets nothing now."""
        queue = self.queues[worker]
        if len(queue) >= self.depth:
            return None
        if self.fresh < min(self.batches, self.written + self.window):
            queue.append(self.fresh)
            self.fresh += 1
            return queue[-1], None
        if queue:  # a batch moved to a busy worker would only wait there again
            return None
        waiting = [(q[i], other) for other, q in enumerate(self.queues) for i in range(1, len(q))]
        if not waiting:
            return None
        k, other = min(waiting)
        self.queues[other].remove(k)
        queue.append(k)
        return k, other

    def done(self, worker: int, k: int) -> None:
        """``worker`` returned batch ``k``."""
        self.queues[worker].remove(k)


class Claims:
    """The ledger of batches taken over (one small Ray actor): batch ``k`` belongs to the worker it was first handed
    to unless the driver has moved it (:meth:`move`, before it hands the batch out again)."""

    def __init__(self):
        self.moved: dict[int, int] = {}

    def move(self, k: int, worker: int) -> None:
        self.moved[k] = worker

    def owns(self, k: int, worker: int) -> bool:
        return self.moved.get(k, worker) == worker


class Worker:
    """One Ray actor: builds what ``factory`` makes once, then proposes certificates for batches of indices."""

    def __init__(self, factory: Factory, threads: int, claims: str, me: int):
        import ray

        torch.set_num_threads(max(1, threads))
        self.method, self.ctx, self.inputs = factory()
        # the ledger is found by its name (an actor handle among the constructor's arguments may be gone when Ray
        # restarts this actor); ``me`` is this worker's number in the driver's hand-out
        self.ledger, self.me = ray.get_actor(claims), me

    def propose(self, k: int, batch: Sequence[int]) -> tuple[list[Any], float] | None:
        """The method's :meth:`propose` output for the dataset indices ``batch`` (the ``k``-th batch) and seconds
        per input; ``None`` without computing when the ledger says batch ``k`` has moved to another worker."""
        import ray

        if not ray.get(self.ledger.owns.remote(k, self.me)):
            return None
        x, labels = self.inputs(batch)
        t0 = time.perf_counter()
        out = self.method.propose(self.ctx, x, labels, batch)
        return out, (time.perf_counter() - t0) / len(batch)


def run_distributed(results: ResultsFile, inputs: Callable, indices: Sequence[int], method: CertifyMethod,
                    ctx: RunContext, factory: Factory, *, workers: int, address: str | None = None,
                    inputs_per_batch: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                    on_open: Callable[[list[int]], None] | None = None, progress: bool = True) -> Path:
    """Certify ``indices`` on ``workers`` Ray actors built by ``factory``; this process writes ``results`` in
    dataset order and runs ``method.finish`` (memory) on each batch; resumes like
    :func:`~smoothcert.cli.runner.run_dataset`."""
    import ray

    check_count("workers", workers)
    own = [c for c in results.columns if c not in RUNNER_COLUMNS]
    done = resume_point(results, indices)
    if on_open is not None:
        on_open(done)
    todo = list(indices[len(done):])
    batches = [todo[s:s + inputs_per_batch] for s in range(0, len(todo), inputs_per_batch)]
    if not batches:
        return results.path
    owns_ray = connect(workers, address, cpus_per_worker)
    remote = ray.remote(Worker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=-1,
                                        max_task_retries=-1)
    name = f"smoothcert-claims-{os.getpid()}-{time.time_ns()}"
    claims = ray.remote(Claims).options(name=name, num_cpus=0).remote()
    actors = [remote.remote(factory, max(1, int(cpus_per_worker)), name, w) for w in range(workers)]
    bar = progress_reporter(len(indices), initial=len(done), enabled=progress, unit="input",
                            desc=str(results.config.get("command", "run")))
    pending: dict[Any, tuple[int, int]] = {}  # object ref -> (batch, worker)
    arrived: dict[int, tuple[list[Any], float]] = {}
    # Batches are handed out at most a window ahead of the next one to write, so a slow worker never makes the
    # others pile up results here (and the rows reach the file at a steady pace).
    hand = HandOut(len(batches), workers)

    def feed(worker: int) -> None:
        while (job := hand.take(worker)) is not None:
            k, moved_from = job
            if moved_from is not None:  # it waited on a busy worker: withdrawn there first (never read there)
                del pending[next(r for r, (b, w) in pending.items() if (b, w) == (k, moved_from))]
                ray.get(claims.move.remote(k, worker))
            pending[actors[worker].propose.remote(k, batches[k])] = (k, worker)

    try:
        for worker in range(workers):
            feed(worker)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            k, worker = pending.pop(ref)
            hand.done(worker, k)
            try:
                arrived[k] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise (e.cause if isinstance(e.cause, Exception) else e) from None
            while hand.written in arrived:
                proposals, seconds = arrived.pop(hand.written)
                batch = batches[hand.written]
                x, labels = inputs(batch)
                records = method.finish(ctx, x, labels, batch, proposals)
                results.append(batch_rows(records, batch, labels, seconds, own))
                bar.update(len(batch))
                hand.written += 1
            for other in range(workers):
                feed(other)
    finally:
        bar.close()
        for actor in (*actors, claims):
            ray.kill(actor)
        if owns_ray:
            ray.shutdown()
    return results.path
