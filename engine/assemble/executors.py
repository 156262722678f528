"""Executors of the build graph (``engine.assemble.graph``): in this process, or as tasks on Ray.

Both run the same units (``engine.assemble.units.run_unit``), which skip themselves when their
done-marker exists: what an executor adds is where and when each unit runs. ``LocalExecutor``
runs them on this machine: one after another in this process, or, for a large enough build on a
CPU, in ``jobs`` processes of a few torch threads each (a tiny model's per-sample gradients keep
one thread busy but not two, so two single-threaded processes do nearly twice the work on two
cores); ``RayExecutor`` submits one Ray task per unit, its dependencies
passed as the results of the tasks it needs, so that Ray's scheduler runs each unit when its inputs
are ready, on any worker with a free CPU (or GPU: ``gpus_per_task``), and retries a unit whose
worker died (``max_retries``). One progress bar on the driver counts the units of the whole
cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from engine import parallel
from engine.assemble import graph, units
from engine.assemble.context import WorkContext
from engine.attribution.settings import BuildConfig
from engine.errors import ExecutorError, ResourceError
from engine.run.layout import RunLayout

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")
INSTALL_RAY = "pip install 'trakview[ray]'"
WAIT_WARNING_SECONDS = 600  # a warning when no unit finishes for this long (a stuck cluster?)
# Below this many (training pair, checkpoint) gradients a build stays in one process: starting a
# worker process (importing torch, making the model) costs a few seconds.
PARALLEL_MIN_GRADIENTS = 5000


class Executor(Protocol):
    name: str

    def describe(self) -> dict[str, Any]:
        """What ran the build, for the manifest."""
        ...

    def run(self, plan: list[graph.Unit], out: Path, cfg: BuildConfig) -> None:
        """Runs every unit of ``plan`` that has no done-marker yet."""
        ...


def _todo(plan: list[graph.Unit], out: Path) -> list[graph.Unit]:
    layout = RunLayout(out)
    return [u for u in plan if not layout.unit_done(u.id)]


def auto_jobs(plan: list[graph.Unit], cfg: BuildConfig, cpus: int | None = None) -> int:
    """Processes for ``LocalExecutor(jobs=0)``: one on a GPU or for a small build, else one per
    CPU core, at most ``parallel.MAX_AUTO_JOBS`` and at most one per checkpoint."""
    cpus = cpus or parallel.cpus()
    gradients = sum(u.rows[1] - u.rows[0] for u in plan if u.kind == "featurize")
    if cfg.device != "cpu" or gradients < PARALLEL_MIN_GRADIENTS:
        return 1
    return max(1, min(cpus, parallel.MAX_AUTO_JOBS, len(cfg.checkpoints)))


@dataclass
class LocalExecutor:
    """Runs the units on this machine.

    With one job, in this process in the plan's order, sharing one ``WorkContext``. With more,
    in ``jobs`` worker processes of ``threads`` torch threads each (default: the CPU count
    divided among them), each with its own ``WorkContext`` for the whole build; a unit is started
    as soon as the units it needs are done, in the plan's order otherwise. ``jobs=0`` picks
    with ``auto_jobs``. The results do not depend on which process runs a unit, but float sums
    do depend on the number of threads.
    """

    jobs: int = 0  # worker processes; 1 = this process; 0 = auto_jobs
    threads: int = 0  # torch threads per worker process; 0 = the CPU count / jobs
    name: str = "local"
    used: dict[str, int] = field(default_factory=dict, init=False)  # the last run's

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.used}

    def run(self, plan: list[graph.Unit], out: Path, cfg: BuildConfig) -> None:
        if self.jobs < 0 or self.threads < 0:
            raise ExecutorError(
                f"--jobs and threads must be 0 (auto) or more, got {self.jobs} and {self.threads}"
            )
        todo = _todo(plan, out)
        jobs = min(self.jobs or auto_jobs(plan, cfg), max(1, len(todo)))
        bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="build", unit="unit")
        with bar:
            if jobs <= 1:
                self.used = {"jobs": 1}
                ctx = WorkContext(out, cfg)
                for unit in todo:
                    bar.set_postfix_str(unit.id)
                    units.run_unit(unit, ctx)
                    bar.update(1)
                return
            threads = parallel.threads_per_job(jobs, self.threads)
            self.used = {"jobs": jobs, "threads_per_job": threads}
            self._run_parallel(plan, todo, out, cfg, jobs, threads, bar)

    def _run_parallel(
        self,
        plan: list[graph.Unit],
        todo: list[graph.Unit],
        out: Path,
        cfg: BuildConfig,
        jobs: int,
        threads: int,
        bar: tqdm,
    ) -> None:
        if cfg.workers < 0:  # the jobs already use the cores: each reads its images itself
            cfg = replace(cfg, workers=0)
        done = {u.id for u in plan} - {u.id for u in todo}
        waiting = list(todo)
        running: dict[Future, graph.Unit] = {}
        with parallel.Pool(jobs, threads, _start_local_worker, (str(out), cfg)) as pool:
            while waiting or running:
                for unit in [u for u in waiting if all(d in done for d in u.deps)]:
                    if len(running) >= jobs:
                        break
                    waiting.remove(unit)
                    running[pool.submit(_run_local_unit, unit)] = unit
                if not running:  # cannot happen with a valid plan: a unit waits on a missing one
                    missing = sorted({d for u in waiting for d in u.deps} - done)
                    raise RuntimeError(f"units wait on units that never run: {missing[:5]}")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    unit = running.pop(future)
                    try:  # a unit's error stops the build at once (finished units are kept)
                        future.result()
                    except BrokenProcessPool as err:
                        raise ResourceError(
                            f"a worker process died while running {unit.id} (out of memory?); "
                            "run the build again to resume it, with fewer --jobs"
                        ) from err
                    done.add(unit.id)
                    bar.set_postfix_str(unit.id)
                    bar.update(1)


_WORKER_CONTEXT: WorkContext | None = None  # a local worker process's, for the whole build


def _start_local_worker(out: str, cfg: BuildConfig) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = WorkContext(Path(out), cfg)


def _run_local_unit(unit: graph.Unit) -> dict[str, Any]:
    assert _WORKER_CONTEXT is not None, "a local worker runs units after its initializer"
    return units.run_unit(unit, _WORKER_CONTEXT)


def run_in_worker(
    out: str, cfg: BuildConfig, unit: graph.Unit, threads: int, *deps: Any
) -> dict[str, Any]:
    """A Ray task's body: one unit, with a context of its own, on ``threads`` CPU threads (the
    task's CPUs; float sums depend on the thread count). ``deps`` only order the tasks."""
    import torch

    torch.set_num_threads(threads)
    return units.run_unit(unit, WorkContext(Path(out), cfg))


def import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ExecutorError(
            f"--executor ray needs Ray, which is not installed here: {INSTALL_RAY} "
            "(on the driver and on every worker of the cluster)"
        ) from err
    return ray


@dataclass
class RayExecutor:
    """Runs each unit as a Ray task.

    Connects to the cluster at ``address`` (``auto``: the one ``ray start`` made on this machine),
    or starts a local one with ``num_cpus`` CPUs when there is none; a cluster already connected
    (``ray.init`` called before) is used as it is. Every worker must see the run directory at
    the same path (shared storage) and have trakview installed.
    """

    address: str | None = None
    gpus_per_task: float = 0.0  # GPUs reserved by each unit that computes (embed, featurize, ...)
    max_retries: int = 3  # times Ray reruns a unit whose worker died
    cpus_per_task: int = 1  # CPUs (and torch threads) of each task
    num_cpus: int | None = None  # CPUs of a local cluster started here
    name: str = "ray"
    cluster: dict[str, float] = field(default_factory=dict, init=False)  # the last run's

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "gpus_per_task": self.gpus_per_task,
            "max_retries": self.max_retries,
            "cpus_per_task": self.cpus_per_task,
            "cluster": self.cluster,
        }

    def task(self) -> Callable[..., dict[str, Any]]:
        """The function each Ray task runs."""
        return run_in_worker

    def run(self, plan: list[graph.Unit], out: Path, cfg: BuildConfig) -> None:
        ray = import_ray()
        if cfg.device.startswith("cuda") and not self.gpus_per_task:
            raise ExecutorError(
                "--device cuda on Ray needs GPUs for the tasks: add --gpus-per-task 1 (or 0.5 "
                "to run two units on one GPU)"
            )
        started = not ray.is_initialized()
        if started:
            ray.init(
                address=self.address,
                num_cpus=None if self.address else self.num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        resources = ray.cluster_resources()
        self.cluster = {k: v for k, v in resources.items() if not k.startswith("node:")}
        try:
            self._run(ray, plan, out, cfg)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray: Any, plan: list[graph.Unit], out: Path, cfg: BuildConfig) -> None:
        remote = ray.remote(self.task())
        cfg_ref = ray.put(cfg)
        refs: dict[str, Any] = {}
        for unit in _todo(plan, out):
            deps = [refs[d] for d in unit.deps if d in refs]  # finished ones are not waited for
            refs[unit.id] = remote.options(
                name=unit.id,
                num_cpus=self.cpus_per_task,
                num_gpus=self.gpus_per_task if unit.uses_device else 0,
                max_retries=self.max_retries,
            ).remote(str(Path(out).resolve()), cfg_ref, unit, self.cpus_per_task, *deps)
        pending = list(refs.values())
        with tqdm(
            total=len(plan), initial=len(plan) - len(refs), desc="build on ray", unit="unit"
        ) as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=WAIT_WARNING_SECONDS)
                if not ready:
                    log.warning(
                        "no unit has finished for %d s (%d left); the cluster has %s free",
                        WAIT_WARNING_SECONDS,
                        len(pending),
                        ray.available_resources(),
                    )
                    continue
                try:
                    marker = ray.get(ready[0])
                except Exception:
                    for ref in pending:
                        ray.cancel(ref)
                    raise
                bar.set_postfix_str(f"{marker['unit']} on {marker['host']}")
                bar.update(1)


def make(
    name: str = "local",
    address: str | None = None,
    gpus_per_task: float = 0.0,
    max_retries: int = 3,
    jobs: int = 0,
) -> Executor:
    """The executor the command line asks for.

    Raises:
        ExecutorError: an unknown name, Ray options without ``ray``, local options with it, or
            Ray not installed.
    """
    if name not in EXECUTORS:
        raise ExecutorError(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if jobs < 0:
        raise ExecutorError(f"--jobs must be 0 (auto) or a number of processes, got {jobs}")
    if name == "local":
        if address or gpus_per_task:
            raise ExecutorError(
                "--ray-address and --gpus-per-task apply to --executor ray only; add "
                "--executor ray, or drop them"
            )
        return LocalExecutor(jobs=jobs)
    if jobs:
        raise ExecutorError(
            "--jobs applies to --executor local only: Ray runs one task per free CPU (or GPU) of "
            "the cluster; drop --jobs"
        )
    import_ray()
    if gpus_per_task < 0:
        raise ExecutorError(f"--gpus-per-task must be 0 or more, got {gpus_per_task}")
    return RayExecutor(address=address, gpus_per_task=gpus_per_task, max_retries=max_retries)
