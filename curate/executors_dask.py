"""The Dask executor: part tasks on a Dask cluster, a LocalCluster or an existing scheduler.

Tasks are `curate.task.run_part` (and `summarize_part` for global fits) submitted with
`client.map` over small task objects; the data moves through the store, never through the
scheduler, so the store (the run folder) must be a path every worker can read and write (a
shared filesystem); the executor checks this at start and names the workers that cannot.
- `DaskExecutor(workers=N)` starts a `LocalCluster` of N worker processes with one thread each,
  so an engine never shares its process with another task; on a CUDA machine each worker
  advertises `GPU=1`. `DaskExecutor(scheduler="tcp://host:8786")` joins an existing cluster
  (Slurm via dask-jobqueue, Kubernetes via the Dask operator; README).
- A task asks for what its stages declare (`Stage.resources()`, e.g. `{"GPU": 1}`) when some
  worker advertises that resource; otherwise it runs anywhere (with a warning).
- A stage's models load once per worker process (the worker's own model cache) and are released
  on every worker when the stage's parts are done.
- A worker that dies mid-task: Dask runs the task again elsewhere (`retries`, plus Dask's own
  rescheduling of tasks from lost workers); the driver commits each part once, whatever arrives.
- Worker processes start without Dask's default `MALLOC_TRIM_THRESHOLD_=65536`: setting it turns
  off glibc's adaptive mmap threshold, so every large tensor a model stage allocates is a fresh
  mmap, page-faulted and unmapped again (measured here: SmolLM2 forward passes 26.2 s in a Dask
  worker against 20.3 s in the driver; 20.4 s without the variable). `prepare` warns when a model
  stage will run on workers that have it (an existing cluster), naming how to start them.
Leaves out: a store on object storage (s3://): the store is a local or shared path.

Example: run_pipeline(pipeline, executor=DaskExecutor(workers=2))
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Callable, Iterable, Iterator

from curate.errors import ConfigError
from curate.task import close_stages

log = logging.getLogger(__name__)

TRIM = "MALLOC_TRIM_THRESHOLD_"
TRIM_CONFIG = f"distributed.nanny.pre-spawn-environ.{TRIM}"


def _trim_threshold() -> str | None:
    """On a worker: its MALLOC_TRIM_THRESHOLD_, if set. Example: client.run(_trim_threshold)"""
    return os.environ.get(TRIM)


def _can_use_store(root: str, probe: str, token: str) -> str | None:
    """On a worker: None when the store is readable and writable here, else what went wrong."""
    try:
        with open(probe, encoding="utf-8") as f:
            if f.read() != token:
                return f"{probe} has other content here"
        path = os.path.join(root, f".curate-probe-{uuid.uuid4().hex[:8]}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(token)
        os.remove(path)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _release(keys: list[str] | None) -> None:
    """On a worker: close the stages with these keys (all when None), freeing their models."""
    close_stages(keys)


class DaskExecutor:
    """Runs part tasks on Dask workers. Example: DaskExecutor(scheduler="tcp://127.0.0.1:8786")"""

    name = "dask"

    def __init__(self, scheduler: str | None = None, workers: int | None = None, retries: int = 2):
        import dask
        from distributed import Client, LocalCluster

        self.retries = retries
        self.cluster = None
        if scheduler:
            try:
                self.client = Client(scheduler, timeout="30s")
            except OSError as exc:
                raise ConfigError(f"cannot reach the Dask scheduler: {exc}", where=scheduler) from None
        else:
            from curate.backends.cache import cuda_available

            resources = {"GPU": 1} if cuda_available() else None
            with dask.config.set({TRIM_CONFIG: None}):  # None: the nanny leaves the variable unset
                self.cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                                            processes=True, resources=resources, dashboard_address=":0")
            self.client = Client(self.cluster)
        self.resources: dict[str, dict[str, float]] = {}
        log.info("dask: %d workers, dashboard %s", len(self.client.scheduler_info()["workers"]),
                 self.client.dashboard_link)

    # The Executor interface ------------------------------------------------------------------
    def prepare(self, stages: Iterable[Any], root: str) -> None:
        """Check every worker sees the store; note what each stage's tasks need."""
        self._check_store(root)
        stages = list(stages)
        if any(planned.bound.stage.kind == "model" for planned in stages):
            self._warn_trim_threshold()
        advertised = self._advertised()
        for planned in stages:
            wanted = planned.bound.stage.resources()
            missing = [r for r in wanted if r not in advertised]
            if missing:
                log.warning("stage '%s' asks for %s, which no worker advertises: it runs on any worker",
                            planned.id, ", ".join(missing))
            self.resources[planned.key] = {r: v for r, v in wanted.items() if r in advertised}

    def map(self, fn: Callable[[Any], Any], tasks: list[Any]) -> Iterator[Any]:
        """Submit every task, yield results as they finish; on a task error, yield what already
        finished, cancel the rest and raise."""
        from distributed import as_completed

        if not tasks:
            return
        run = uuid.uuid4().hex[:8]
        keys = [f"{fn.__name__}-{run}-{i:05d}" for i in range(len(tasks))]
        futures = set(self.client.map(fn, tasks, key=keys, pure=False, retries=self.retries,
                                      resources=self._task_resources(tasks[0])))
        try:
            for future in as_completed(list(futures)):
                result = future.result()
                # Forget a result once it is here: a held future whose worker dies later is computed
                # again by Dask (an attempt nobody commits, left in the run folder).
                futures.discard(future)
                future.release()
                yield result
        except Exception:
            done = [f for f in futures if f.status == "finished"]
            self.client.cancel([f for f in futures if not f.done()])
            for future in done:
                yield future.result()
            raise

    def release(self, stage_keys: list[str]) -> None:
        """The segment is done: free its stages' models on every worker."""
        self.client.run(_release, stage_keys)

    def close(self) -> None:
        if self.client.status == "closed":
            return
        try:
            self.client.run(_release, None)
        except Exception as exc:  # closing must not hide the error that led here
            log.warning("releasing models on the workers failed: %s", exc)
        finally:
            self.client.close()
            if self.cluster is not None:
                try:
                    self.cluster.close()
                except Exception as exc:  # e.g. a nanny still restarting a killed worker: the run is done
                    log.warning("closing the local Dask cluster failed: %s: %s", type(exc).__name__, exc)

    # Helpers -----------------------------------------------------------------------------------
    def _advertised(self) -> set[str]:
        return {r for w in self.client.scheduler_info()["workers"].values() for r in w.get("resources", {})}

    def _task_resources(self, task: Any) -> dict[str, float] | None:
        keys = [s.key for s in task.stages] if hasattr(task, "stages") else []
        merged: dict[str, float] = {}
        for key in keys:
            for name, amount in self.resources.get(key, {}).items():
                merged[name] = max(merged.get(name, 0), amount)
        return merged or None

    def _warn_trim_threshold(self) -> None:
        """Warn when workers run with MALLOC_TRIM_THRESHOLD_ set (slow large allocations; module docstring)."""
        trimmed = {worker: value for worker, value in self.client.run(_trim_threshold).items() if value is not None}
        if trimmed:
            log.warning("%d of the Dask workers run with %s=%s (Dask's default), which makes model stages' torch "
                        "allocations page-fault every time (~25%% slower measured); start them with "
                        "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{\"%s\": None}' in their environment",
                        len(trimmed), TRIM, next(iter(trimmed.values())), TRIM)

    def _check_store(self, root: str) -> None:
        token = uuid.uuid4().hex
        probe = os.path.join(root, f".curate-probe-{token[:8]}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write(token)
        try:
            answers = self.client.run(_can_use_store, root, probe, token)
        finally:
            os.remove(probe)
        blind = {worker: why for worker, why in answers.items() if why}
        if blind:
            first = next(iter(blind.items()))
            raise ConfigError(f"{len(blind)} Dask worker(s) cannot use the run folder (it must be a path every "
                              f"worker can read and write, e.g. a shared filesystem): {first[0]}: {first[1]}",
                              where=root)
