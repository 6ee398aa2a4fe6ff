"""The terminal of the `curate` command: log levels, one log format, and the console progress bars share.

`configure(debug, quiet)` is what the CLI calls first. It sets:
- curate's own logs at INFO (WARNING with `-q`, DEBUG with `--debug`), on stderr, as `HH:MM:SS message`
  (warnings and errors also name their level and logger);
- the engines and libraries curate drives (vLLM, torch, transformers, datasets, Dask's distributed,
  httpx) at WARNING, or INFO with `--debug`. vLLM's own log setup is turned off
  (`VLLM_CONFIGURE_LOGGING=0`, unless the user set it), so its records come through the one handler
  here, with curate's format, above the progress bars; torch's C++ warnings at ERROR
  (`TORCH_CPP_LOG_LEVEL`) unless `--debug`;
- the engine warnings in `EXPECTED` dropped unless `--debug`: each is vLLM or torch telling us
  about a setting curate chose on purpose on CPU (the reasons are listed with them), printed on
  every engine start, so a newcomer would read them as problems.
On a terminal (stderr is a TTY) at the default level, `live_console()` returns the rich console that
`curate.progress` draws its live bars on; log lines are printed through it, above the bars.
Library use (`run_pipeline` from Python) never calls `configure`: logging stays the caller's.

Example: configure(debug=False, quiet=False); logging.getLogger("vllm").level -> logging.WARNING
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

from curate.redaction import SecretFilter

# Loggers of the engines and libraries a run drives: WARNING unless --debug.
LIBRARIES = ("vllm", "torch", "transformers", "datasets", "distributed", "httpx", "httpx2", "huggingface_hub",
             "sentence_transformers", "urllib3", "filelock", "asyncio")

# (logger, message start): warnings about settings curate makes on purpose, dropped unless --debug.
EXPECTED = [
    # vllm_engine runs the engine in-process on CPU (VLLM_ENABLE_V1_MULTIPROCESSING=0); every random
    # choice of curate is seeded from the row id, never from the global generator this warns about.
    ("vllm.engine.arg_utils", "The global random seed is set to"),
    # Chunked prefill is off on CPU (vllm_engine's docstring: a seeded request cannot rewind the CPU
    # generator). vLLM warns for every model that supports it; with max_num_batched_tokens =
    # max_model_len each prompt is prefilled whole in one step, which is vLLM's non-chunked path, and
    # the tests compare its log-probs with transformers' (tests/test_backends.py).
    ("vllm.engine.arg_utils", "This model does not officially support disabling chunked prefill"),
    # enforce_eager on CPU (compilation costs ~90 s for little), and what it implies.
    ("vllm.config.vllm", "Enforce eager set"),
    ("vllm.config.vllm", "Inductor compilation was disabled"),
    # triton is uninstalled on CPU (scripts/install-cpu.sh: unused there, 1 GB), and what it implies.
    ("vllm.platforms.cpu", "Triton is not installed"),
    ("vllm.config.vllm", "Model Runner V2 requires Triton"),
    ("torch._library.triton", "Triton not available"),
    ("vllm.platforms.cpu", "Reset SSM cache type"),  # state-space models only; ours are transformers
    # One line per weight when a checkpoint's dtype differs from the `dtype:` the pipeline asked for
    # (a user's fp32 folder run in bf16); curate's own conversions are kept in the run's dtype.
    ("vllm.model_executor.models.utils", "Attempted to load weight"),
    # Performance hints of the CPU worker (README: Terminal); --debug shows them.
    ("vllm.v1.worker.cpu_worker", "libtcmalloc is not found"),
    ("vllm.v1.worker.cpu_worker", "libiomp is not found"),
    ("vllm.v1.worker.cpu_worker", "CPU backend doesn't allow to use `torch.set_num_threads`"),
    # vLLM's CPU worker sets VLLM_DIST_IDENT in os.environ itself; a process started from one that ran an
    # engine (a test, a notebook) inherits it, and vLLM then calls its own variable unknown.
    ("vllm.platforms.interface", "Unknown vLLM environment variable detected: VLLM_DIST_IDENT"),
    # vLLM's own use of a torch name deprecated in torch 2.13 (a Python FutureWarning, seen as a log record).
    ("py.warnings", "`torch.distributed.reduce_op` is deprecated"),
]

_console: Any = None  # the rich Console of the live display, when there is one


class _Expected(logging.Filter):
    """Drops the records of one logger whose message starts with one of the given texts."""

    def __init__(self, starts: list[str]):
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "py.warnings":  # "path:line: Category: message"
            message = message.split(": ", 2)[-1]
        return not message.startswith(self.starts)


class _Format(logging.Formatter):
    """`HH:MM:SS message` for INFO; level and logger name too for other levels, and for every line with --debug."""

    def __init__(self, debug: bool) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        self._style._fmt = ("%(asctime)s %(message)s" if record.levelno == logging.INFO and not self.debug
                            else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        return super().format(record)


class _ConsoleHandler(logging.Handler):
    """Writes log lines through the rich console, so they appear above a live progress display."""

    def __init__(self, console: Any):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, emoji=False, soft_wrap=True)
        except Exception:  # a log line must never break the run
            self.handleError(record)


def configure(debug: bool = False, quiet: bool = False) -> None:
    """Set up logging for the CLI (module docstring). Example: configure(debug=False, quiet=True)"""
    global _console
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    library_level = logging.INFO if debug else logging.WARNING
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if debug else "warning")
    if debug:  # transformers and datasets set their loggers' level from these when they are imported
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
        os.environ.setdefault("DATASETS_VERBOSITY", "info")
    else:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    _console = _live_console() if level == logging.INFO else None
    handler: logging.Handler = _ConsoleHandler(_console) if _console is not None else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format(debug))
    handler.addFilter(SecretFilter())  # tokens and URL credentials never reach the terminal (curate.redaction)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings of libraries become log records: one format, filtered
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(max(level, library_level))
    for name in {logger for logger, _ in EXPECTED}:
        target = logging.getLogger(name)
        for old in [f for f in target.filters if isinstance(f, _Expected)]:
            target.removeFilter(old)
        if not debug:
            target.addFilter(_Expected([start for logger, start in EXPECTED if logger == name]))


def quiet_library_progress() -> None:
    """No progress bars of transformers, datasets or the Hub client during a run: curate draws its own.

    Example: quiet_library_progress()  # before any model loads
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _live_console() -> Any:
    """A rich Console on stderr when stderr is a real terminal (not dumb, not redirected), else None."""
    if not sys.stderr.isatty() or os.environ.get("TERM") == "dumb":
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal and not console.is_dumb_terminal else None


def live_console() -> Any:
    """The console live progress bars draw on, or None (not a terminal, `-q`, `--debug`, or library use).

    Example: live_console() -> <console width=120 ColorSystem.TRUECOLOR> on a terminal
    """
    return _console
