"""Publishing a finished run: the dataset in Hub layout, every stage's rejects, fitted states.

Everything published is a hard link (or a copy) of a file a manifest lists, swapped in with
renames so no half-written folder is ever visible: `data/train-XXXXX-of-NNNNN.parquet`,
`rejects/<stage id>/part-XXXXX.parquet`, `states/<stage id>.parquet`. Files of failed or
superseded attempts are never listed, so never published. Leaves out: the funnel (`curate.stats`).

Example: publish(plan, store, "out/q") -> out/q/data/train-00000-of-00001.parquet
"""
from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq

from curate.ingest import SOURCE_ID
from curate.plan import Plan
from curate.record import STATES_DIR
from curate.store import Store, part_name, read_table_file


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _swap_dir(new: str, final: str) -> None:
    """Replace folder `final` by `new` with renames, so no half-written folder is ever visible."""
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _fresh(out_dir: str, name: str) -> str:
    tmp = os.path.join(out_dir, f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def clean_stale(out_dir: str) -> None:
    """Remove temporary files and folders a killed run left behind (never a committed file).

    Runs under the run folder's lock before anything else writes, so no temporary file found
    here can belong to a live writer. Example: clean_stale("out/q")
    """
    for root, dirs, files in os.walk(out_dir):
        for name in [d for d in dirs if ".tmp-" in d or ".old-" in d]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)
        for name in files:
            if ".tmp-" in name:
                os.remove(os.path.join(root, name))


def publish(plan: Plan, store: Store, out_dir: str) -> None:
    """Publish the final dataset (Hub layout), the rejects of every stage and the fitted states.

    Example: publish(plan, store, "out/q") -> out/q/data/train-00000-of-00001.parquet
    """
    n = plan.source.n_parts
    last = plan.segments[-1].key
    tmp = _fresh(out_dir, "data")
    for i in range(n):
        shard = os.path.join(tmp, f"train-{i:05d}-of-{n:05d}.parquet")
        part = store.part_file(last, i)
        if part.endswith(".parquet"):
            _link(part, shard)
        else:  # a pipeline without stages publishes its source parts, stored as Arrow IPC
            pq.write_table(read_table_file(part), shard)
    _swap_dir(tmp, os.path.join(out_dir, "data"))
    tmp = _fresh(out_dir, "rejects")
    for i in range(n):
        for path in store.reject_files(plan.source.key, i).values():
            _link(path, os.path.join(tmp, SOURCE_ID, part_name(i)))
    for segment in plan.segments:
        ids = {s.key: s.id for s in segment.stages}
        for i in range(n):
            for stage_key, path in store.reject_files(segment.key, i).items():
                _link(path, os.path.join(tmp, ids[stage_key], part_name(i)))
    _swap_dir(tmp, os.path.join(out_dir, "rejects"))
    tmp = _fresh(out_dir, STATES_DIR)
    for planned in plan.stages:
        if planned.kind == "global" and os.path.exists(store.state_path(planned.key)):
            _link(store.state_path(planned.key), os.path.join(tmp, f"{planned.id}.parquet"))
    _swap_dir(tmp, os.path.join(out_dir, STATES_DIR))
