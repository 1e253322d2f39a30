"""MetaSchedule tuning.

:func:`compile_tuned` contract: the kernels of the module (ours and TVM's) are tuned with
MetaSchedule into the JSON database in ``Tuning.database`` (created if missing, reused
and extended on later runs), then the module is built with :func:`.pipelines.tuned`,
which applies the database; what the database does not cover gets the schedules of the
default build (our kernels: the rules of :mod:`.schedule_rules`; TVM's operators: the
generic parallel CPU schedule, or DLight on GPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tvm
from tqdm.auto import tqdm
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.target import Target

from . import pipelines

__all__ = ["Tuning", "compile_tuned", "open_database", "tune_module", "with_num_cores"]


@dataclass(frozen=True)
class Tuning:
    """How to tune with MetaSchedule.

    trials: total measured candidates over all kernels (0: only apply the database).
    database: directory of the JSON database; created if missing, reused and updated.
    max_trials_per_task: cap per kernel (default: trials).
    cost_model: "random" (no extra dependency) or "xgb" (needs xgboost).
    num_trials_per_iter: candidates measured per search round.
    build_timeout_s / run_timeout_s: per-candidate limits of the local builder / runner
        (worker start-up, which imports TVM, counts against the first build).
    max_workers: parallel build processes (default: TVM's, one per logical core).
    progress: show a progress bar (tqdm) over the measured candidates.
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

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 0:
            raise ValueError(f"Tuning.trials must be an int >= 0, got {self.trials!r}")
        if self.cost_model not in ("xgb", "random"):
            raise ValueError(
                f"Tuning.cost_model must be 'xgb' or 'random', got {self.cost_model!r}"
            )
        if self.num_trials_per_iter < 1:
            raise ValueError("Tuning.num_trials_per_iter must be >= 1")


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


class _Progress:
    """A measure callback that advances a tqdm bar by the candidates measured."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="tuning", unit="trial")

    def callback(self) -> Any:
        bar = self.bar

        @derived_object
        class _Callback(PyMeasureCallback):
            def apply(
                self, task_scheduler, task_id, measure_candidates, builder_results, runner_results
            ) -> None:
                bar.update(len(measure_candidates))

        return _Callback()


def tune_module(mod: tvm.IRModule, target: Target, tune: Tuning) -> ms.database.JSONDatabase:
    """Tune every kernel of ``mod`` (a Relax module) into the database; return it."""
    database = open_database(tune)
    if tune.trials == 0:
        return database
    prepared = pipelines.prepare_for_tuning(target)(mod)
    tasks = ms.relax_integration.extract_tasks(prepared, target)
    work_dir = str(Path(tune.database))
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir=work_dir, num_threads="physical"
    )
    callbacks = ms.measure_callback.MeasureCallback.create("default")
    progress = _Progress(tune.trials) if tune.progress else None
    if progress is not None:
        callbacks = [*callbacks, progress.callback()]
    try:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=work_dir,
            max_trials_global=tune.trials,
            max_trials_per_task=tune.max_trials_per_task,
            num_trials_per_iter=tune.num_trials_per_iter,
            database=database,
            cost_model=tune.cost_model,
            measure_callbacks=callbacks,
            builder=ms.builder.LocalBuilder(
                timeout_sec=tune.build_timeout_s, max_workers=tune.max_workers
            ),
            runner=ms.runner.LocalRunner(timeout_sec=tune.run_timeout_s),
        )
    finally:
        if progress is not None:
            progress.bar.close()
    return database


def compile_tuned(mod: tvm.IRModule, target: Target, tune: Tuning) -> relax.Executable:
    """Tune ``mod`` (our kernels unscheduled) for ``target`` and build it with the
    database (:func:`.pipelines.tuned`)."""
    target = with_num_cores(target)
    database = tune_module(mod, target, tune)
    with target, database:
        return tvm.compile(mod, target, relax_pipeline=pipelines.tuned(target))
