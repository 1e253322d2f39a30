"""Tuning through a TVM RPC tracker and two servers on localhost; resuming and reusing
a tuning database; interrupting a tuning run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("tvm")
pytest.importorskip("tornado")  # TVM's RPC tracker

import tbn_compiler as tbn  # noqa: E402
from tbn_compiler.backends.tuning import (  # noqa: E402
    RPCTracker,
    Tuning,
    TuningPlan,
    plan_tuning,
)

KEY = "tbn-test"
CFG = tbn.TBNConfig(p=4, min_numel=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """A TVM RPC process in its own process group (so that its children stop with it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def rpc_servers(tmp_path_factory):
    """A tracker and two servers of key ``KEY`` on localhost: (``"host:port:key"``, the
    servers' log files). Always stopped, whatever the tests do."""
    logs = tmp_path_factory.mktemp("rpc")
    port = _free_port()
    processes: list[subprocess.Popen] = []
    try:
        tracker = ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port)]
        processes.append(_start([*tracker, "--port-end", str(port + 1)], logs / "tracker.log"))
        server_logs = []
        for i in range(2):
            server_port = _free_port()
            server_logs.append(logs / f"server{i}.log")
            server = ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port)]
            server += ["--port-end", str(server_port + 1), "--key", KEY]
            processes.append(_start([*server, "--tracker", f"127.0.0.1:{port}"], server_logs[-1]))
        _wait_for_servers(RPCTracker("127.0.0.1", port, KEY), 2, processes)
        yield f"127.0.0.1:{port}:{KEY}", server_logs
    finally:
        _stop(processes)


def _wait_for_servers(tracker: RPCTracker, count: int, processes, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if tracker.count_servers(timeout_s=5) >= count:
                return
        except RuntimeError:
            pass  # tracker not up, or no server registered yet
        dead = [p.args for p in processes if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            pytest.fail(f"RPC servers did not come up (exited: {dead})")
        time.sleep(0.5)


def _records(db: Path) -> list[dict]:
    path = db / "database_tuning_record.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval()


def _rpc_tuning(db: Path, rpc: str, trials: int = 2) -> Tuning:
    return Tuning(
        trials=trials,
        database=db,
        rpc=rpc,
        strategy="replay-trace",
        num_trials_per_iter=2,
        max_workers=1,
        progress=False,
    )


@pytest.mark.timeout(600)
def test_rpc_tuning_measures_on_the_servers_and_reuses_its_database(rpc_servers, tmp_path):
    rpc, server_logs = rpc_servers
    db = tmp_path / "db"
    x = torch.randn(4, 64)
    model = _model(0)
    cm = tbn.compile(model, (x,), config=CFG, tune=_rpc_tuning(db, rpc), dynamic_batch=False)
    torch.testing.assert_close(cm(x), tbn.rewrite(model, (x,), CFG)(x), rtol=1e-4, atol=1e-5)
    records = _records(db)
    assert records, "tuning wrote no records"
    served = [log.read_text() for log in server_logs]
    assert any("load_module" in text for text in served), served

    # the same tuning again, and another model with the same layer shapes: nothing new
    for seed in (0, 1):
        other = _model(seed)
        again = tbn.compile(other, (x,), config=CFG, tune=_rpc_tuning(db, rpc), dynamic_batch=False)
        assert len(_records(db)) == len(records)
        torch.testing.assert_close(again(x), tbn.rewrite(other, (x,), CFG)(x), rtol=1e-4, atol=1e-5)


def test_rpc_without_servers_names_the_command_to_start_one() -> None:
    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        tune = Tuning(trials=2, rpc=f"127.0.0.1:{port}:none")
        with pytest.raises(RuntimeError, match="python -m tvm.exec.rpc_tracker"):
            RPCTracker.parse(tune.rpc).count_servers(timeout_s=2)


@pytest.mark.parametrize("bad", ["localhost:9190", "localhost:port:key", ":9190:key", "a:1:"])
def test_rpc_address_is_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="host:port:key"):
        Tuning(rpc=bad)


def test_tuning_a_symbolic_batch_asks_for_a_static_build(tmp_path) -> None:
    import tvm

    from tbn_compiler.backends.relax_import import import_graph
    from tbn_compiler.backends.tuning import tune_module

    x = torch.randn(4, 64)
    mod = import_graph(tbn.rewrite(_model(0), (x,), CFG), (x,), dynamic_batch=True).mod
    with pytest.raises(ValueError, match="dynamic_batch=False"):
        tune_module(mod, tvm.target.Target("llvm"), Tuning(trials=2, database=tmp_path))
    assert not _records(tmp_path)


def test_tuning_plan_counts_what_the_database_holds() -> None:
    """``trials`` is what the kernels should have: measurements already made count."""
    assert plan_tuning(Tuning(trials=8), [0, 0, 0]) == TuningPlan([0, 1, 2], 8, 0)
    assert plan_tuning(Tuning(trials=8), [3, 0, 2]) == TuningPlan([0, 1, 2], 3, 5)
    assert plan_tuning(Tuning(trials=8), [5, 4, 0]) == TuningPlan([], 0, 9)
    capped = Tuning(trials=8, max_trials_per_task=2)
    assert plan_tuning(capped, [2, 0, 7]) == TuningPlan([1], 2, 4)


_INTERRUPTED_RUN = """
import sys, torch
from torch import nn
import tbn_compiler as tbn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
tune = tbn.Tuning(trials=8, database=sys.argv[1], strategy="replay-trace",
                  num_trials_per_iter=2, max_workers=1, progress=False)
tbn.compile(model, (torch.randn(4, 64),), config=tbn.TBNConfig(p=4, min_numel=0), tune=tune,
            dynamic_batch=False)
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_keeps_the_measurements_and_a_rerun_resumes(tmp_path) -> None:
    db = tmp_path / "db"
    run = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_INTERRUPTED_RUN), str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not _records(db) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert run.poll() is None, run.stderr.read()[-2000:]
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0
    assert "KeyboardInterrupt: tuning interrupted" in err, err[-2000:]
    kept = len(_records(db))
    assert 0 < kept < 8

    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_INTERRUPTED_RUN), str(db)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    measured = len(_records(db)) - kept
    assert 0 < measured < 8  # only what was missing
