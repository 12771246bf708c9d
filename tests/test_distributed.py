"""Certification on Ray workers: the same rows as a local run, resumable after kill -9, workers that die or raise.

The cluster is started once per session on 127.0.0.1 with usage statistics off and 2 CPUs; nothing contacts
another address.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytest
import torch

# Before Ray is imported: its services on 127.0.0.1 only, no usage statistics, no token for this local cluster.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
os.environ.update(RAY_ENV)

from smoothcert.cli.main import main, worker_state, build_parser, certify_state
from smoothcert.models.architectures import model_for_dataset
from smoothcert.models.checkpoint import save_checkpoint

ray = pytest.importorskip("ray")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    path = os.pathsep.join(p for p in [SRC, os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, **RAY_ENV, "PYTHONPATH": path}


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                out[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return out


def stop_cluster(temp_dir: str) -> None:
    """Stop the Ray processes of the cluster rooted at ``temp_dir`` and their children, and no other Ray on the
    machine (``ray stop --force`` would kill every Ray process of the user, e.g. a run beside the tests)."""
    parents = _parents()
    mine, pid = set(), os.getpid()
    while pid > 1 and pid not in mine:  # this process and its ancestors are never stopped
        mine.add(pid)
        pid = parents.get(pid, 1)
    doomed = {pid for pid in parents if temp_dir in _cmdline(str(pid))} - mine
    grown = True
    while grown:
        more = {pid for pid, parent in parents.items() if parent in doomed} - doomed - mine
        doomed |= more
        grown = bool(more)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in doomed):
            time.sleep(0.2)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A local Ray head on 127.0.0.1 with 2 CPUs, in its own temporary directory; its GCS address. Teardown stops
    this cluster's processes only."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="scray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                    "--temp-dir", temp_dir], env=ray_env(), check=True, capture_output=True, timeout=300)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "toy"
    save_checkpoint(path, model_for_dataset("toy-curved", "mlp"), {"dataset": "toy-curved", "sigma": 0.25})
    return path


def certify_args(checkpoint, out, *extra, count=8):
    return ["certify", "--checkpoint", str(checkpoint), "--n0", "10", "--n", "300", "--alpha", "0.01", "--max",
            str(count), "--batch-size", "100", "--seed", "3", "--inputs-per-batch", "2", "--no-progress", "--out",
            str(out), *extra]


DDS = ("--method", "dds", "--opt-samples", "8", "--dds-steps", "3")


def rows(path):
    """The file's rows without the ``time`` column."""
    lines = [line.split("\t") for line in Path(path).read_text().splitlines()]
    at = lines[0].index("time")
    return [line[:at] + line[at + 1:] for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("method", [(), DDS], ids=["fixed", "dds-memory"])
def test_distributed_run_equals_the_local_run_row_for_row(cluster, checkpoint, tmp_path, method):
    assert main(certify_args(checkpoint, tmp_path / "local.tsv", *method)) == 0
    assert main(certify_args(checkpoint, tmp_path / "ray.tsv", *method, "--workers", "2",
                             "--ray-address", cluster)) == 0
    assert rows(tmp_path / "ray.tsv") == rows(tmp_path / "local.tsv")
    assert len(rows(tmp_path / "ray.tsv")) == 9
    if method:  # the memory and the saved noises are the local run's too
        local = sorted(p.name for p in (tmp_path / "local.tsv.noise").iterdir())
        assert sorted(p.name for p in (tmp_path / "ray.tsv.noise").iterdir()) == local


@pytest.mark.slow
def test_kill_minus_nine_of_the_driver_and_a_rerun_give_the_identical_file(cluster, checkpoint, tmp_path):
    count = 60  # results are handed out at most 8 batches (16 inputs) ahead of the file: the kill lands mid-run
    args = certify_args(checkpoint, tmp_path / "ray.tsv", *DDS, "--workers", "2", "--ray-address", cluster,
                        count=count)
    driver = subprocess.Popen([sys.executable, "-m", "smoothcert.cli", *args], env=ray_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        path = tmp_path / "ray.tsv"
        if path.exists() and len(path.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the run ended before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    written = len((tmp_path / "ray.tsv").read_text().splitlines()) - 1
    assert 0 < written < count
    assert main(args) == 0
    assert main(certify_args(checkpoint, tmp_path / "local.tsv", *DDS, count=count)) == 0
    assert rows(tmp_path / "ray.tsv") == rows(tmp_path / "local.tsv")


class FailingInputs:
    """A worker's ``inputs``: exits the worker process (``mode="die"``, once, marked by a file) or raises
    (``mode="raise"``) when the batch holds ``index``."""

    def __init__(self, inputs, index, mode, marker):
        self.inputs, self.index, self.mode, self.marker = inputs, index, mode, marker

    def __call__(self, batch):
        if self.index in batch:
            if self.mode == "raise":
                raise ValueError(f"input {self.index} cannot be read")
            if not os.path.exists(self.marker):
                Path(self.marker).write_text("died once")
                os._exit(1)
        return self.inputs(batch)


def failing_state(args, index, mode, marker):
    method, ctx, inputs = worker_state(args)
    return method, ctx, FailingInputs(inputs, index, mode, marker)


class SlowInputs:
    """A worker's ``inputs``: logs ``pid batch`` to ``log``; on the batch that holds ``index`` it waits (at most
    ``timeout`` seconds) until another worker has started the batch that begins at ``then``."""

    def __init__(self, inputs, index, then, log, timeout=60.0):
        self.inputs, self.index, self.then, self.log, self.timeout = inputs, index, then, log, timeout

    def __call__(self, batch):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {batch[0]}\n")
        if self.index in batch:
            deadline, me = time.time() + self.timeout, str(os.getpid())
            while time.time() < deadline and [str(self.then)] not in (
                    line.split()[1:] for line in Path(self.log).read_text().splitlines() if line.split()[0] != me):
                time.sleep(0.1)
        return self.inputs(batch)


def slow_state(args, index, then, log):
    method, ctx, inputs = worker_state(args)
    return method, ctx, SlowInputs(inputs, index, then, log)


def run(checkpoint, out, cluster, factory_args=None, count=8, state=failing_state):
    """Certify through :func:`run_distributed` with the command's own objects and, optionally, failing workers."""
    from smoothcert.cli.distributed import run_distributed
    from smoothcert.cli.runner import CERTIFY_COLUMNS, ResultsFile
    from smoothcert.methods.base import COMMON_COLUMNS

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    args = build_parser().parse_args(certify_args(checkpoint, out, *DDS, count=count))
    method, ctx, inputs, indices, run_config = certify_state(args)
    columns = CERTIFY_COLUMNS + COMMON_COLUMNS + tuple(c for c in method.columns if c not in COMMON_COLUMNS)
    results = ResultsFile(Path(out), columns, {"command": "certify", **run_config, "n0": args.n0,
                                               "method": method.config()})
    factory = partial(worker_state, args) if factory_args is None else partial(state, args, *factory_args)
    try:
        run_distributed(results, inputs, indices, method, ctx, factory, workers=2, address=cluster,
                        inputs_per_batch=2, on_open=lambda done: method.open(ctx, results.path, done),
                        progress=False)
    finally:
        method.close()


@pytest.mark.slow
def test_a_worker_that_dies_has_its_inputs_redone(cluster, checkpoint, tmp_path):
    marker = tmp_path / "died"
    run(checkpoint, tmp_path / "ray.tsv", cluster, (5, "die", str(marker)))
    assert marker.exists()  # a worker did die on the batch of input 5
    assert main(certify_args(checkpoint, tmp_path / "local.tsv", *DDS)) == 0
    assert rows(tmp_path / "ray.tsv") == rows(tmp_path / "local.tsv")


@pytest.mark.slow
def test_a_batch_waiting_behind_a_slow_one_is_taken_over_by_an_idle_worker(cluster, checkpoint, tmp_path):
    # Three batches of two inputs on two workers: the first worker is handed the batches of inputs 0-1 and 2-3, the
    # second one that of inputs 4-5. The first worker holds on to inputs 0-1 until another worker has started inputs
    # 2-3 (at most 60 s): once the second worker is done, it takes them over. Without the take-over the first worker
    # computes them itself, after 60 s. The first worker reaches the copy that waited only after the move (it is held
    # until the second worker has started it), so the ledger makes it skip that copy: every batch is computed once.
    log = tmp_path / "calls"
    run(checkpoint, tmp_path / "ray.tsv", cluster, (0, 2, str(log)), count=6, state=slow_state)
    calls = [line.split() for line in log.read_text().splitlines()]
    first_worker = next(pid for pid, first in calls if first == "0")
    second_worker = next(pid for pid, first in calls if first == "4")
    assert first_worker != second_worker
    assert next(pid for pid, first in calls if first == "2") == second_worker  # taken over, and started there first
    assert sorted(first for _, first in calls) == ["0", "2", "4"]  # once each: the copy that waited was skipped
    assert main(certify_args(checkpoint, tmp_path / "local.tsv", *DDS, count=6)) == 0
    assert rows(tmp_path / "ray.tsv") == rows(tmp_path / "local.tsv")


@pytest.mark.slow
def test_a_worker_that_raises_stops_the_run_with_its_message_and_the_file_resumes(cluster, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="input 6 cannot be read"):
        run(checkpoint, tmp_path / "ray.tsv", cluster, (6, "raise", ""))
    written = [r[0] for r in rows(tmp_path / "ray.tsv")[1:]]
    assert written == [str(i) for i in range(len(written))] and len(written) <= 6  # a prefix, before input 6
    run(checkpoint, tmp_path / "ray.tsv", cluster)
    assert main(certify_args(checkpoint, tmp_path / "local.tsv", *DDS)) == 0
    assert rows(tmp_path / "ray.tsv") == rows(tmp_path / "local.tsv")


@pytest.mark.parametrize("extra, message", [
    (("--workers", "0"), "workers (--workers) must be"),
    (("--workers", "2", "--worker-cpus", "0"), "worker CPUs (--worker-cpus) must be"),
    (("--ray-address", "nowhere"), "--ray-address must be HOST:PORT"),
])
def test_bad_distributed_options_are_refused_before_anything_runs(checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.tsv"
    assert main(certify_args(checkpoint, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_an_unreachable_cluster_is_refused_within_seconds(checkpoint, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(certify_args(checkpoint, tmp_path / "bad.tsv", "--ray-address", f"127.0.0.1:{free_port()}")) == 2
    assert time.perf_counter() - t0 < 30
    assert "cannot reach a Ray cluster at 127.0.0.1:" in capsys.readouterr().err
    assert not (tmp_path / "bad.tsv").exists()
