"""curate: declarative pipelines that turn prompts into preference datasets (prompt / chosen / rejected).

`import curate` is cheap: it loads no model and registers no integration. The pieces:
`curate.config` (YAML -> specs), `curate.plan` (keys, schemas, segments), `curate.runner`
(local executor), `curate.sources`, `curate.contract` (column types, stage kinds), the stages in
`curate.filters`, `curate.pairing`, `curate.formatting`, and the `curate` CLI.

Example: from curate import load_pipeline, run_pipeline; run_pipeline(load_pipeline("pipelines/quickstart.yaml"))
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("curate")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def load_pipeline(path: str, overrides: list[str] | None = None):
    """Read and validate a pipeline file. Example: load_pipeline("pipelines/quickstart.yaml")"""
    from curate.config import load_pipeline as _load

    return _load(path, overrides)


def run_pipeline(pipeline, out: str | None = None, refresh: list[str] | None = None) -> dict:
    """Run a pipeline in-process and return its stats. Example: run_pipeline(p)["rows_out"]"""
    from curate.runner import run_pipeline as _run

    return _run(pipeline, out, refresh)


__all__ = ["__version__", "load_pipeline", "run_pipeline"]
