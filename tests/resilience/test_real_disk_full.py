"""The run folder on a real tmpfs too small for the run: it fills, the run stops with a clear error, the
filesystem grows, the run resumes to the uninterrupted output (tests/resilience/real_disk_full.py).

Mounting needs root with CAP_SYS_ADMIN: where this process may not mount, the tests are skipped
with the mount command's own refusal (tests/resilience/test_disk_full.py injects ENOSPC instead).
"""
from __future__ import annotations

import errno

import pytest
from click.testing import CliRunner

from tests.resilience.real_disk_full import mount_refused, real_disk_full
from tests.resilience.scenarios import prepare_cpu_run


@pytest.fixture(scope="module")
def may_mount() -> None:
    why = mount_refused()
    if why:
        pytest.skip(f"needs the right to mount a tmpfs (root with CAP_SYS_ADMIN): {why}")


def test_a_disk_full_error_that_names_no_file_names_the_run_folder(tmp_path, monkeypatch):
    """Arrow's ENOSPC names no file ("Error writing bytes to file. Detail: [errno 28] ..."): the line names the run folder."""
    import curate.store
    from curate.cli import main

    prepare_cpu_run(tmp_path, rows=600)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(curate.store.pq, "write_table", full)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["-q", "run", "p.yaml", "--out", "out"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (f"error: {tmp_path / 'out'}: No space left on device; "
                                                      "finished parts are kept, free space and run again")


def _check(outcomes):
    assert outcomes
    for outcome in outcomes:
        assert outcome.ok, outcome


def test_a_really_full_filesystem_stops_the_run_clearly_and_the_resumed_run_loses_nothing(tmp_path, may_mount):
    _check(real_disk_full(tmp_path, fractions=(0.6,)))


@pytest.mark.resilience_full
def test_really_full_at_nine_sizes_then_resume_loses_nothing(tmp_path, may_mount):
    _check(real_disk_full(tmp_path, fractions=tuple(i / 10 for i in range(1, 10))))
