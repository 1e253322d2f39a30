"""MetaSchedule tuning.

:func:`compile_tuned` contract: the kernels of the module (ours and TVM's) are tuned with
MetaSchedule into the JSON database in ``Tuning.database`` (created if missing, reused
and extended on later runs), then the module is built with :func:`.pipelines.tuned`,
which applies the database; what the database does not cover gets the schedules of the
default build (our kernels: the rules of :mod:`.schedule_rules`; TVM's operators: the
generic parallel CPU schedule, or DLight on GPUs).

Budget and reuse: ``Tuning.trials`` is the number of measurements the module's kernels
should have in the database, for this target. Measurements already there count: those
of an earlier, interrupted run (Ctrl-C keeps every measurement made so far; the same
call resumes), and those of another model with kernels of the same shapes (workloads
are matched structurally). A run measures only what is missing, and none when nothing
is; a kernel with ``max_trials_per_task`` measurements is not tuned again.

Measurements run on this machine, or with ``Tuning(rpc="host:port:key")`` on the servers
registered under ``key`` with the TVM RPC tracker at ``host:port`` (candidates are
built here, for the target, and sent as ``.tar`` object files that each server links
with its C compiler; one measurement at a time per server).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import linecache
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tvm
from tqdm.auto import tqdm
from tvm import relax, rpc
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.target import Target

from . import pipelines

__all__ = [
    "RPCTracker",
    "Tuning",
    "TuningPlan",
    "compile_tuned",
    "import_tensor_intrinsics",
    "measured_counts",
    "open_database",
    "plan_tuning",
    "tune_module",
    "with_num_cores",
]


@dataclass(frozen=True)
class Tuning:
    """How to tune with MetaSchedule.

    trials: measurements the module's kernels should have in the database, those made
        before included (0: only apply the database); a run measures what is missing.
    database: directory of the JSON database; created if missing, reused and updated.
    max_trials_per_task: cap per kernel (default: trials).
    cost_model: "random" (no extra dependency) or "xgb" (needs xgboost).
    num_trials_per_iter: candidates measured per search round.
    build_timeout_s / run_timeout_s: per-candidate limits of the local builder / runner
        (worker start-up, which imports TVM, counts against the first build).
    max_workers: parallel build processes (default: TVM's, one per logical core).
    progress: show a progress bar (tqdm) over the measured candidates.
    rpc: ``"host:port:key"`` of a TVM RPC tracker: measure on its servers of that key
        (see the module docstring); None measures on this machine.
    strategy: "evolutionary" (MetaSchedule's search, guided by the cost model) or
        "replay-trace" (random schedules of the search space: no search cost, for
        quick runs).
    """

    trials: int = 64
    database: str | os.PathLike = "tbn_tuning"
    max_trials_per_task: int | None = None
    cost_model: str = "random"
    num_trials_per_iter: int = 16
    build_timeout_s: float = 120.0
    run_timeout_s: float = 60.0
    max_workers: int | None = None
    progress: bool = True
    rpc: str | None = None
    strategy: str = "evolutionary"

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 0:
            raise ValueError(f"Tuning.trials must be an int >= 0, got {self.trials!r}")
        if self.cost_model not in ("xgb", "random"):
            raise ValueError(
                f"Tuning.cost_model must be 'xgb' or 'random', got {self.cost_model!r}"
            )
        if self.num_trials_per_iter < 1:
            raise ValueError("Tuning.num_trials_per_iter must be >= 1")
        if self.max_trials_per_task is not None and self.max_trials_per_task < 1:
            raise ValueError("Tuning.max_trials_per_task must be >= 1 (or None)")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Tuning.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.rpc is not None:
            RPCTracker.parse(self.rpc)


STRATEGIES = ("evolutionary", "replay-trace")


@dataclass(frozen=True)
class RPCTracker:
    """A TVM RPC tracker and the key its measuring servers registered with."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, text: str) -> RPCTracker:
        """``"host:port:key"`` -> RPCTracker; ValueError naming the expected form."""
        parts = text.rsplit(":", 2) if isinstance(text, str) else []
        if len(parts) != 3 or not all(parts) or not parts[1].isdigit():
            raise ValueError(
                f"Tuning.rpc must be 'host:port:key' (a TVM RPC tracker and the key of its "
                f"servers, e.g. '127.0.0.1:9190:cpu'), got {text!r}"
            )
        return cls(parts[0], int(parts[1]), parts[2])

    def config(self, timeout_s: float) -> ms.runner.RPCConfig:
        return ms.runner.RPCConfig(
            tracker_host=self.host,
            tracker_port=self.port,
            tracker_key=self.key,
            session_timeout_sec=timeout_s,
        )

    def count_servers(self, timeout_s: float) -> int:
        """The servers registered under ``key``; RuntimeError when there are none or the
        tracker cannot be reached, saying how to start them."""
        try:  # a plain connection first: TVM's client retries in a thread that outlives it
            socket.create_connection((self.host, self.port), timeout=timeout_s).close()
            summary = rpc.connect_tracker(self.host, self.port).summary()
        except (OSError, RuntimeError) as exc:
            raise RuntimeError(
                f"cannot reach the TVM RPC tracker at {self.host}:{self.port} ({exc}); start "
                f"it with: python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {self.port}"
            ) from exc
        count = sum(1 for s in summary["server_info"] if s["key"].rsplit(":", 1)[-1] == self.key)
        if count == 0:
            raise RuntimeError(
                f"no RPC server with key {self.key!r} is registered with the tracker at "
                f"{self.host}:{self.port}; start one on each measuring machine with: "
                f"python -m tvm.exec.rpc_server --tracker {self.host}:{self.port} --key {self.key}"
            )
        return count


def open_database(tune: Tuning) -> ms.database.JSONDatabase:
    """The JSON database of ``tune`` (its directory created if missing)."""
    root = Path(tune.database)
    root.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(root / "database_workload.json"),
        path_tuning_record=str(root / "database_tuning_record.json"),
        module_equality="structural",
    )


def with_num_cores(target: Target) -> Target:
    """``target`` with ``num-cores`` set (MetaSchedule needs it on CPUs)."""
    if target.kind.name != "llvm" or target.attrs.get("num-cores"):
        return target
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    spec = {**dict(target.export()), "num-cores": int(cores)}
    host = spec.pop("host", None)
    return Target(spec, host=host) if host else Target(spec)


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin``, which MetaSchedule's tune contexts and builder
    import, in seconds instead of minutes.

    Its ~500 TVMScript functions each call ``inspect.stack()``, which looks up the module
    of every frame; for the import machinery's frames that lookup scans all of
    ``sys.modules`` (thousands once torch is loaded, which apache-tvm-ffi does): 88 s
    on 2 cores. TVM's parser reads only the frames, their names and source lines, so
    during the import ``inspect.stack`` returns those without the lookup."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _stack_without_module_lookup
    try:
        importlib.import_module("tvm.s_tir.tensor_intrin")
    finally:
        inspect.stack = original


def _stack_without_module_lookup(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack()`` of the caller (one source line per frame, no module lookup)."""
    frame = sys._getframe(1)
    infos = []
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno)
        lines, index = ([line], 0) if line and context > 0 else (None, None)
        infos.append(
            inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, lines, index)
        )
        frame = frame.f_back
    return infos


class _Progress:
    """A measure callback that advances a tqdm bar by the candidates measured."""

    def __init__(self, total: int, kernels: int, reused: int) -> None:
        self.bar = tqdm(total=total, desc=f"tuning {kernels} kernels", unit="trial")
        if reused:
            self.bar.set_postfix_str(f"{reused} from the database")

    def callback(self) -> Any:
        bar = self.bar

        @derived_object
        class _Callback(PyMeasureCallback):
            def apply(
                self, task_scheduler, task_id, measure_candidates, builder_results, runner_results
            ) -> None:
                bar.update(len(measure_candidates))

        return _Callback()


def measured_counts(database: ms.database.Database, tasks: Sequence[Any]) -> list[int]:
    """Measurements the database holds per extracted task, for the task's target (failed
    ones count: measuring them again would fail again)."""
    records = database.get_all_tuning_records()
    counts = []
    for task in tasks:
        if not database.has_workload(task.dispatched[0]):
            counts.append(0)
            continue
        workload = database.commit_workload(task.dispatched[0])  # the stored one
        target = str(task.target)
        counts.append(
            sum(1 for r in records if r.workload.same_as(workload) and str(r.target) == target)
        )
    return counts


@dataclass(frozen=True)
class TuningPlan:
    """What a run measures: ``tasks`` (indices into the extracted tasks) and ``trials``
    new measurements; ``reused`` measurements were already in the database."""

    tasks: list[int]
    trials: int
    reused: int


def plan_tuning(tune: Tuning, counts: Sequence[int]) -> TuningPlan:
    """The measurements still missing for a module whose kernels have ``counts``."""
    cap = tune.max_trials_per_task or tune.trials
    have = [min(n, cap) for n in counts]
    todo = [i for i, n in enumerate(have) if n < cap]
    missing = max(0, min(tune.trials - sum(have), sum(cap - have[i] for i in todo)))
    return TuningPlan(todo if missing else [], missing, sum(have))


def _runner(tune: Tuning) -> Any:
    if tune.rpc is None:
        return ms.runner.LocalRunner(timeout_sec=tune.run_timeout_s)
    tracker = RPCTracker.parse(tune.rpc)
    servers = tracker.count_servers(timeout_s=tune.run_timeout_s)
    return ms.runner.RPCRunner(tracker.config(tune.run_timeout_s), max_workers=servers)


def tune_module(mod: tvm.IRModule, target: Target, tune: Tuning) -> ms.database.JSONDatabase:
    """Tune the kernels of ``mod`` (a Relax module) into the database until they have
    ``tune.trials`` measurements for ``target`` (see the module docstring); return it.
    Ctrl-C (SIGINT) keeps what was measured and raises KeyboardInterrupt saying so.
    MetaSchedule's log goes to ``<database>/logs``, not the console."""
    runner = _runner(tune) if tune.trials else None  # an unreachable tracker writes nothing
    database = open_database(tune)
    if tune.trials == 0:
        return database
    _check_static(mod)
    prepared = pipelines.prepare_for_tuning(target)(mod)
    tasks = ms.relax_integration.extract_tasks(prepared, target)
    plan = plan_tuning(tune, measured_counts(database, tasks))
    if not plan.tasks:
        return database
    work_dir = str(Path(tune.database))
    import_tensor_intrinsics()
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [tasks[i] for i in plan.tasks],
        work_dir=work_dir,
        strategy=tune.strategy,
        num_threads="physical",
    )
    _log_to_files_only()
    callbacks = ms.measure_callback.MeasureCallback.create("default")
    progress = _Progress(plan.trials, len(plan.tasks), plan.reused) if tune.progress else None
    if progress is not None:
        callbacks = [*callbacks, progress.callback()]
    with _sigint_noted() as interrupted:
        try:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=work_dir,
                max_trials_global=plan.trials,
                max_trials_per_task=tune.max_trials_per_task,
                num_trials_per_iter=tune.num_trials_per_iter,
                database=database,
                cost_model=tune.cost_model,
                measure_callbacks=callbacks,
                builder=ms.builder.LocalBuilder(
                    timeout_sec=tune.build_timeout_s,
                    max_workers=tune.max_workers,
                    initializer=import_tensor_intrinsics,
                ),
                runner=runner,
            )
        except BaseException as exc:
            # a Ctrl-C inside MetaSchedule's callbacks comes back as a TVM error
            if interrupted or isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt(
                    f"tuning interrupted; the database {work_dir} keeps the measurements "
                    f"made ({len(database)} in all): run again with it to resume"
                ) from exc
            raise
        finally:
            if progress is not None:
                progress.bar.close()
            _shut_down(runner)
    return database


def _check_static(mod: tvm.IRModule) -> None:
    """ValueError when ``main`` has symbolic shapes: MetaSchedule tunes static kernels
    only (it would find no valid schedule, or fail)."""
    symbolic = [str(v) for v in relax.analysis.defined_symbolic_vars(mod["main"])]
    if symbolic:
        raise ValueError(
            f"tuning needs static shapes, and this module's are symbolic in {symbolic}; "
            "compile with dynamic_batch=False to tune (the module then takes the example "
            "inputs' batch size only)"
        )


def _log_to_files_only() -> None:
    """Keep MetaSchedule's log (a table per round) off the console: its log files under
    the database directory get all of it; the console only warnings and errors."""
    for handler in logging.getLogger("tvm.s_tir.meta_schedule").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(logging.WARNING)


@contextlib.contextmanager
def _sigint_noted() -> Iterator[list[bool]]:
    """Within: a SIGINT is recorded (the yielded list gets an entry) and then raises
    KeyboardInterrupt as usual. Only in the main thread (elsewhere nothing changes)."""
    noted: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    previous = signal.getsignal(signal.SIGINT)

    def note(signum: int, frame: Any) -> None:
        noted.append(True)
        if callable(previous):
            previous(signum, frame)  # Python's default handler raises KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def _shut_down(runner: Any) -> None:
    """Stop the runner's worker processes (they would linger until collected)."""
    pool = getattr(runner, "pool", None)
    if pool is not None:
        pool.shutdown()


def compile_tuned(mod: tvm.IRModule, target: Target, tune: Tuning) -> relax.Executable:
    """Tune ``mod`` (our kernels unscheduled) for ``target`` and build it with the
    database (:func:`.pipelines.tuned`)."""
    target = with_num_cores(target)
    database = tune_module(mod, target, tune)
    with target, database:
        return tvm.compile(mod, target, relax_pipeline=pipelines.tuned(target))
