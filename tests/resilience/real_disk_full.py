"""Scenario: the run folder on a real, tiny filesystem (tmpfs) that fills up, then grows, then the run resumes.

Needs the right to mount (root with CAP_SYS_ADMIN); `mount_refused()` says why not where it is
missing. For each size (a fraction of what the whole run writes) a fresh tmpfs is mounted, the
CPU pipeline (tests/resilience/scenarios.py) runs with `--out` on it until the filesystem is
really full, and the scenario checks: the run ends with one `error:` line that names a path on
that filesystem and says `No space left on device`; nothing half-written is published; every
part committed before the failure reads back. Then the filesystem is remounted larger
(`mount -o remount,size=...`, the space "freed"), the run resumes, and its output must equal an
uninterrupted run's, with every part committed before the failure kept as it was (same file,
not recomputed). Unmounted in a `finally`.

Example: [o.ok for o in real_disk_full(tmp_path, fractions=(0.5,))]
"""
from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from tests.resilience.scenarios import (Outcome, curate, nothing_half_written, one_error_line, prepare_cpu_run, published,
                                       resume, whole_json_lines)


def mount_refused() -> str | None:
    """None when this process may mount a tmpfs, else why not (the mount command's own words)."""
    with tempfile.TemporaryDirectory(prefix="curate-mount-probe-") as probe:
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot run mount: {exc}"
        if done.returncode != 0:
            return f"mounting a tmpfs is not permitted here: {done.stderr.strip() or done.returncode}"
        subprocess.run(["umount", probe], check=True, timeout=30)
    return None


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` while the block runs. Example: with tmpfs(p, 8 << 20): ..."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], timeout=60)  # busy: detach it now, freed when unused


def grow(path: Path, size: int) -> None:
    """Give a mounted tmpfs more room (the space "freed"). Example: grow(p, 64 << 20)"""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=30)


def disk_bytes(folder: Path) -> int:
    """Bytes a folder's files take on disk (allocated blocks, hard links counted once)."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        info = path.lstat()
        if (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total


def committed_files(out: Path) -> dict[str, tuple[int, int]]:
    """Every committed part file (by the manifests) -> (inode, mtime_ns): what a resumed run must keep as it is."""
    files = {}
    for manifest in (out / "parts").glob("*/manifest.jsonl") if (out / "parts").exists() else []:
        for record in whole_json_lines(manifest):  # a line cut short: not committed
            if "file" not in record:
                continue
            path = manifest.parent / record["file"]
            if path.exists():
                info = path.stat()
                files[str(path.relative_to(out))] = (info.st_ino, info.st_mtime_ns)
    return files


def real_disk_full(folder: Path, fractions: tuple[float, ...] = (0.5,), rows: int = 3000) -> list[Outcome]:
    """One fresh tmpfs per fraction of the run's full size; fill it, grow it, resume. See the module docstring."""
    prepare_cpu_run(folder, rows, part_rows=250)
    clean = curate(folder, "-q", "run", "p.yaml", "--out", "clean")
    assert clean.returncode == 0, clean.stderr
    expected = published(folder / "clean")
    need = disk_bytes(folder / "clean")
    outcomes = []
    for i, fraction in enumerate(fractions):
        mount = folder / f"mnt-{i}"
        out = mount / "out"
        label = f"tmpfs of {fraction:.0%} of {need >> 10} KiB"
        with tmpfs(mount, max(64 << 10, int(need * fraction))):
            failed = curate(folder, "-q", "run", "p.yaml", "--out", str(out))
            problems = nothing_half_written(out)
            if failed.returncode == 0:
                problems.append("the run fit on the small filesystem: no disk-full moment met")
            else:
                problems += one_error_line(failed.stderr, "No space left on device")
                if str(mount) not in failed.stderr:
                    problems.append(f"the error names no path on the full filesystem: {failed.stderr.strip()[-300:]!r}")
            kept = committed_files(out)
            grow(mount, 4 * need + (1 << 20))
            outcome = resume(folder, str(out), expected, "real disk full", problems)
            after = committed_files(out)
            changed = [name for name, was in kept.items() if after.get(name) != was]
            outcome.problems += [f"{len(changed)} of {len(kept)} parts committed before the failure were redone: "
                                 f"{changed[:3]}"] if changed else []
            outcome.problems = [f"{label}: {p}" for p in outcome.problems]
            outcomes.append(outcome)
    return outcomes
