"""The `curate` command line: a thin layer over `curate.config`, `curate.plan` and `curate.runner`.

Errors meant for the user print as one line (`error: file:line: message`) with a non-zero exit
code and no traceback; `--debug` shows the traceback. Logging and the terminal are set up by
`curate.terminal`; `curate report` writes a run's HTML report (`curate.report`).

Example: curate run pipelines/quickstart.yaml --out out/quickstart
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
from functools import wraps
from typing import Any, Callable

import click

import curate
from curate.errors import CurateError
from curate.redaction import redact

log = logging.getLogger("curate")

OVERRIDE = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a pipeline value, e.g. --set source.limit=100 (repeatable).")


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn CurateError (and a few OS errors) into one-line messages and exit codes."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        try:
            return func(*args, **kwargs)
        except CurateError as exc:
            if debug:
                raise
            click.echo(f"error: {redact(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
            if debug:
                raise
            click.echo(f"error: {exc.filename or ''}: {exc.strerror}", err=True)
            sys.exit(1)
        except OSError as exc:
            if debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f"{exc.filename}: " if isinstance(exc.filename, str) else ""
            # os.strerror: Arrow's own text ("Error writing bytes to file. Detail: [errno 28] ...") says it less plainly
            click.echo(f"error: {where}{os.strerror(exc.errno)}; finished parts are kept, free space and run again", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; finished parts are kept, run again to resume", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(curate.__version__, prog_name="curate")
@click.option("--debug", is_flag=True, help="Show tracebacks, debug logs and the engines' and libraries' INFO logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors (no progress bars or stage lines).")
def main(debug: bool, quiet: bool) -> None:
    """Build preference datasets (prompt / chosen / rejected) from declarative YAML pipelines."""
    from curate.terminal import configure

    configure(debug=debug, quiet=quiet)  # curate at INFO, engines and libraries at WARNING (curate/terminal.py)


@main.command()
@click.argument("pipeline", type=click.Path())
@OVERRIDE
@click.option("--trl", "trl", is_flag=True,
              help="Instead: check a run folder's (or Parquet folder's) rows against TRL's conversational preference form.")
@_user_errors
def validate(pipeline: str, overrides: tuple[str, ...], trl: bool) -> None:
    """Check a pipeline file and its stage chain against the source's columns; load no model.

    With --trl, PIPELINE is a run folder: check every shard's rows against TRL's explicit-prompt
    conversational preference form and name the first rows that break it.
    """
    if trl:
        from curate.trl_check import check_trl

        report = check_trl(pipeline)
        click.echo(report.summary())
        if not report.ok:
            sys.exit(1)
        return
    from curate.config import load_pipeline
    from curate.runner import make_plan

    spec = load_pipeline(pipeline, list(overrides))
    with _scratch_store(spec) as store:
        make_plan(spec, store)
    click.echo(f"{pipeline}: ok ({len(spec.stages)} stages)")


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@OVERRIDE
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_user_errors
def plan(pipeline: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the resolved chain, the columns after each stage and every stage key; run nothing."""
    from curate.config import load_pipeline
    from curate.plan import model_run_info, schema_json
    from curate.runner import make_plan

    spec = load_pipeline(pipeline, list(overrides))
    with _scratch_store(spec) as store:
        resolved = make_plan(spec, store)
    if as_json:
        click.echo(json.dumps(resolved.to_json(), indent=2))
        return
    src = resolved.source
    size = f"{src.rows} rows in {src.n_parts} parts" if src.rows >= 0 else "rows counted when the run ingests it"
    click.echo(f"source  key {src.key}  {size}")
    _echo_columns(schema_json(src.schema))
    width = max((len(p.id) for p in resolved.stages), default=0)
    for index, planned in enumerate(resolved.stages):  # stages.N: what --set stages.N.… counts (an id works too)
        runs = "".join(f", {k} {v}" for k, v in model_run_info(planned.bound.stage).items())  # model stages: dtype, reference
        click.echo(f"stages.{index:<3d} {planned.id:<{width}}  {planned.bound.stage.name} ({planned.kind}{runs}), "
                   f"segment {planned.segment}  key {planned.key}")
        _echo_columns(schema_json(planned.output_schema))


def _echo_columns(columns: dict[str, str]) -> None:
    for name, dtype in columns.items():
        click.echo(f"    {name}: {dtype}")


class _scratch_store:
    """A Store in a temporary folder for validate/plan, which must not touch the run folder."""

    def __init__(self, spec: Any):
        self.spec = spec

    def __enter__(self):
        import tempfile

        from curate.store import Store

        self._tmp = tempfile.TemporaryDirectory(prefix="curate-plan-")
        return Store(self._tmp.name)

    def __exit__(self, *exc: Any) -> None:
        self._tmp.cleanup()


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(), default=None, help="Run folder (overrides the YAML's output).")
@click.option("--refresh", multiple=True, metavar="STAGE", help="Recompute this stage and all after it (repeatable).")
@click.option("--executor", type=click.Choice(["local", "dask"]), default=None,
              help="Where part tasks run (default: the YAML's executor, else local).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="dask: LocalCluster worker processes.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="dask: join this scheduler (tcp://host:8786; or set DASK_SCHEDULER_ADDRESS).")
@OVERRIDE
@_user_errors
def run(pipeline: str, out: str | None, refresh: tuple[str, ...], executor: str | None, workers: int | None,
        scheduler: str | None, overrides: tuple[str, ...]) -> None:
    """Run a pipeline; resume whatever a previous run of the same pipeline finished."""
    from curate.terminal import quiet_library_progress

    quiet_library_progress()  # before the libraries that read it are imported
    from curate.config import load_pipeline
    from curate.executors import make_executor
    from curate.runner import run_pipeline

    spec = load_pipeline(pipeline, list(overrides))
    chosen = spec.spec.executor
    kind = executor or ("dask" if scheduler or workers else chosen.kind)
    runner = make_executor(kind, workers or chosen.workers, scheduler or chosen.scheduler, chosen.overlap_parts)
    stats = run_pipeline(spec, out, list(refresh), executor=runner)
    click.echo(f"{stats['rows_out']} rows written to {out or spec.spec.output}/data "
               f"({stats['rows_in']} in; dropped: {stats['dropped'] or 'none'})")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--repo", "repo_id", required=True, metavar="OWNER/NAME", help="Dataset repo on the Hub (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH", help="Push to this branch (created from main if missing).")
@click.option("--config-name", default=None, metavar="NAME", help="Push as this config (shards under NAME/; default: data/).")
@click.option("--dry-run", is_flag=True, help="List what would be sent, skipped and deleted; change nothing.")
@click.option("--commit-files", default=50, show_default=True, help="Files per commit (shards are committed in batches).")
@_user_errors
def push(run_dir: str, repo_id: str, private: bool, revision: str | None, config_name: str | None, dry_run: bool,
         commit_files: int) -> None:
    """Push a run folder (shards, dataset card, pipeline.yaml, plan.json, stats.json) to a Hub dataset repo.

    The token comes from HF_TOKEN or `hf auth login`. Files already on the Hub with the same
    content are skipped, so an interrupted push resumes and a repeated push sends nothing.
    """
    from curate.hub import push_run

    root = click.get_current_context().find_root().params
    if not root.get("debug"):
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise
    if root.get("quiet"):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # -q: no upload bars either
    plan = push_run(run_dir, repo_id, private=private, revision=revision, config_name=config_name,
                    dry_run=dry_run, commit_files=commit_files)
    verb = "would send" if dry_run else "sent"
    for item in plan.files:
        click.echo(f"  {(verb if item.send else 'unchanged'):10s} {item.path_in_repo} ({item.size:,} bytes)")
    for path in plan.deletes:
        click.echo(f"  {'would delete' if dry_run else 'deleted':10s} {path} (stale shard)")
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    deleted = f"{len(plan.deletes)} {'to delete' if dry_run else 'deleted'}"
    click.echo(f"{where}: {verb} {len(plan.to_send)} file(s), {len(plan.skipped)} unchanged, {deleted}"
               + ("" if dry_run else f", in {len(plan.commits)} commit(s)"))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Where to write the HTML (default: RUN_DIR/report.html).")
@click.option("--open", "open_it", is_flag=True, help="Open the report in the default web browser.")
@_user_errors
def report(run_dir: str, out: str | None, open_it: bool) -> None:
    """Write one self-contained HTML report of a finished run: funnel, score, margin and length
    distributions, method columns, judge consistency, stage times (no script, nothing fetched)."""
    from curate.report import write_report

    path = write_report(run_dir, out)
    click.echo(path)
    if open_it:
        import pathlib
        import webbrowser

        if not webbrowser.open(pathlib.Path(path).resolve().as_uri()):
            click.echo("no web browser found; open the file above", err=True)


@main.command()
def stages() -> None:
    """List the registered stages (built-in and from the `curate.stages` entry points)."""
    from curate.registry import available

    for name, cls in available().items():
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        click.echo(f"{name:24s} {cls.kind:7s} {summary}")


if __name__ == "__main__":  # pragma: no cover
    main()
