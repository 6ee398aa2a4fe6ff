"""`curate push`: a finished run folder to a Hugging Face Hub dataset repo, through `huggingface_hub`.

What goes up: the shards (`data/train-*.parquet`, or `<config>/train-*.parquet` with a config
name), the dataset card (`README.md`, rendered by `curate.card` with the repo id, its `configs`
merged with the repo's other configs), and the run record (`pipeline.yaml`, `plan.json`,
`stats.json`; under `<config>/` for a named config). How:
- *Resumable*: the repo's tree is listed first; a file whose content is already there (LFS
  sha256, or git blob id for small files) is skipped, so a second push sends no shard again and an
  interrupted push sends only what is missing. Remote shards of this config that the run no
  longer has are deleted in the last commit (the card's `train-*` glob would read them).
- *Bounded*: shards are uploaded (preupload) and committed in batches of `commit_files`; the card
  and run record go in a last commit, so the card never points at shards not yet committed.
- *Retried*: every Hub call is retried with exponential backoff and jitter on 429, 412 (a
  concurrent commit moved the branch), 5xx and connection errors, honouring `Retry-After`.
- *The token* comes from `HF_TOKEN` or the HF login (`huggingface_hub.get_token`); it is sent only
  in the Authorization header. Log records and error messages are scrubbed of it (`curate.redaction`,
  which remembers it as a secret), and a file about to be pushed that contains it is refused.
Leaves out: Xet-specific tuning (the library picks Xet or LFS itself) and pull requests.

Example: push_run("out/quickstart", "me/quickstart-dpo", private=True)
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any, Callable, TypeVar

from curate.card import CARD_FILE, DEFAULT_CONFIG, data_pattern, render_card
from curate.errors import ConfigError, CurateError
from curate.record import PIPELINE_FILE, PLAN_FILE, STATS_FILE, Run, load_run
from curate.redaction import redact, redacted_logs, remember_secret

log = logging.getLogger(__name__)

REPO_TYPE = "dataset"
RETRY_STATUS = {412, 429, 500, 502, 503, 504}
T = TypeVar("T")


class HubError(CurateError):
    """The Hub refused or failed a push step (message scrubbed of the token)."""


@dataclass
class Retry:
    """How Hub calls are retried. Example: Retry(attempts=3, backoff=0.01)"""

    attempts: int = 8
    backoff: float = 1.0
    max_backoff: float = 60.0
    max_retry_after: float = 600.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before try `attempt + 1`: Retry-After if given (capped), else jittered exponential backoff.

        Example: Retry(backoff=1).delay(0, 5.0) -> 5.0
        """
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)


@dataclass
class PushFile:
    """One file of a push: where it goes, where it comes from, and whether it is sent.

    Example: PushFile("data/train-00000-of-00001.parquet", "out/q/data/train-00000-of-00001.parquet", 2048)
    """

    path_in_repo: str
    source: str | bytes  # a local path, or the content (the rendered card)
    size: int
    send: bool = True

    def content(self) -> bytes:
        if isinstance(self.source, bytes):
            return self.source
        with open(self.source, "rb") as f:
            return f.read()


@dataclass
class PushPlan:
    """What a push sends, skips and deletes. Example: plan.to_send -> [PushFile(...), ...]"""

    repo_id: str
    revision: str | None
    config_name: str
    data_dir: str
    files: list[PushFile]
    deletes: list[str] = field(default_factory=list)
    repo_exists: bool = False
    commits: list[str] = field(default_factory=list)

    @property
    def to_send(self) -> list[PushFile]:
        return [f for f in self.files if f.send]

    @property
    def skipped(self) -> list[PushFile]:
        return [f for f in self.files if not f.send]


# Retries --------------------------------------------------------------------------------------


def _retry_reason(exc: BaseException) -> tuple[bool, float | None, str]:
    """(retryable?, Retry-After seconds, short description) for an exception of a Hub call or its causes."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from curate.backends.openai_compat import retry_after_seconds

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, HfHubHTTPError) and seen.response is not None:
            status = seen.response.status_code
            return status in RETRY_STATUS, retry_after_seconds(seen.response.headers.get("retry-after")), f"HTTP {status}"
        if isinstance(seen, httpx2.TransportError):
            return True, None, type(seen).__name__
        seen = seen.__cause__
    return False, None, type(exc).__name__


def hub_call(what: str, call: Callable[[], T], retry: Retry, token: str | None) -> T:
    """Run one Hub call with retries (module docstring); a final failure is a HubError naming `what`.

    Example: hub_call("listing the repo", lambda: list(api.list_repo_tree(...)), Retry(), token)
    """
    for attempt in range(retry.attempts):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as HubError
            retryable, retry_after, reason = _retry_reason(exc)
            if not retryable or attempt == retry.attempts - 1:
                raise _hub_error(what, exc, token, attempt + 1) from None
            delay = retry.delay(attempt, retry_after)
            log.warning("%s: %s, retrying in %.1fs (attempt %d of %d)", what, reason, delay, attempt + 2, retry.attempts)
            retry.sleep(delay)
    raise AssertionError("unreachable")


def _hub_error(what: str, exc: Exception, token: str | None, attempts: int) -> HubError:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        lines = (exc.server_message or str(exc)).splitlines()
        detail = "; ".join(dict.fromkeys(line.strip() for line in lines if line.strip()))  # one line, repeats dropped
        hint = " (check HF_TOKEN or `hf auth login`, and write access to the repo)" if status in (401, 403) else ""
        message = f"{what} failed: HTTP {status}: {detail}{hint}"
    else:
        message = f"{what} failed: {type(exc).__name__}: {exc}"
    if attempts > 1:
        message += f" (after {attempts} attempts)"
    remember_secret(token)
    return HubError(redact(message))


# Planning -------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def same_content(local: PushFile, remote: Any) -> bool:
    """Whether a remote tree entry (huggingface_hub RepoFile) holds exactly this file's bytes.

    LFS files compare sha256; small git files compare the git blob id (sha1 of 'blob <size>\\0' + bytes).
    Example: same_content(PushFile("a.txt", b"x", 1), repo_file) -> True
    """
    from huggingface_hub.utils.sha import git_hash

    if remote is None or getattr(remote, "size", None) != local.size:
        return False
    if getattr(remote, "lfs", None) is not None:
        ours = hashlib.sha256(local.source).hexdigest() if isinstance(local.source, bytes) else _sha256(local.source)
        return ours == remote.lfs.sha256
    return git_hash(local.content()) == remote.blob_id


def local_files(run: Run, card: bytes, config_name: str) -> list[PushFile]:
    """The shards, the card and the run record, with their paths in the repo.

    Example: [f.path_in_repo for f in local_files(run, b"---", "default")][-1] -> 'stats.json'
    """
    data_dir = data_dir_for(config_name)
    prefix = "" if config_name == DEFAULT_CONFIG else f"{config_name}/"
    files = [PushFile(f"{data_dir}/{os.path.basename(p)}", p, os.path.getsize(p)) for p in run.data_files]
    files.append(PushFile(CARD_FILE, card, len(card)))
    for name in (PIPELINE_FILE, PLAN_FILE, STATS_FILE):
        path = os.path.join(run.out_dir, name)
        if os.path.exists(path):
            files.append(PushFile(prefix + name, path, os.path.getsize(path)))
    return files


def data_dir_for(config_name: str) -> str:
    """Where a config's shards live in the repo (the layout `datasets.push_to_hub` uses). Example: data_dir_for("x") -> 'x'"""
    return "data" if config_name == DEFAULT_CONFIG else config_name


def refuse_token_in_files(files: list[PushFile], token: str | None) -> None:
    """Stop before anything is sent if the card or the run record contains the token (shards are not scanned)."""
    if not token:
        return
    for item in files:
        if not item.path_in_repo.endswith(".parquet") and token.encode() in item.content():
            raise HubError(f"{item.path_in_repo} contains your Hugging Face token; remove it from the pipeline "
                           "and run again (nothing was pushed)")


def _remote_card(api: Any, repo_id: str, revision: str | None, retry: Retry, token: str | None) -> dict | None:
    """The front matter of the repo's README.md, to merge this config's metadata into."""
    from huggingface_hub import DatasetCard, hf_hub_download

    with tempfile.TemporaryDirectory(prefix="curate-card-") as tmp:
        path = hub_call("reading the repo's README.md", lambda: hf_hub_download(
            repo_id, CARD_FILE, repo_type=REPO_TYPE, revision=revision, token=token, cache_dir=tmp), retry, token)
        with open(path, encoding="utf-8") as f:
            return DatasetCard(f.read()).data.to_dict()


def plan_push(run: Run, api: Any, repo_id: str, revision: str | None, config_name: str, retry: Retry,
              token: str | None) -> PushPlan:
    """Compare the run with the repo: what to send, what is already there, which stale shards to delete.

    Example: plan_push(run, HfApi(), "me/q", None, "default", Retry(), token).to_send
    """
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    def listing() -> dict[str, Any]:
        try:
            entries = api.list_repo_tree(repo_id, recursive=True, repo_type=REPO_TYPE, revision=revision, token=token)
            return {e.path: e for e in entries if hasattr(e, "blob_id")}
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return {}

    remote = hub_call("listing the repo", listing, retry, token)
    existing = _remote_card(api, repo_id, revision, retry, token) if CARD_FILE in remote else None
    data_dir = data_dir_for(config_name)
    card = render_card(run, repo_id=repo_id, config_name=config_name, data_dir=data_dir, existing=existing).encode()
    files = local_files(run, card, config_name)
    refuse_token_in_files(files, token)
    for item in files:
        item.send = not same_content(item, remote.get(item.path_in_repo))
    ours = {f.path_in_repo for f in files}
    pattern = data_pattern(data_dir)
    deletes = sorted(p for p in remote if fnmatch(p, pattern) and p not in ours)
    return PushPlan(repo_id, revision, config_name, data_dir, files, deletes, repo_exists=bool(remote))


# Pushing --------------------------------------------------------------------------------------


def _commit(api: Any, plan: PushPlan, batch: list[PushFile], deletes: list[str], message: str, retry: Retry,
            token: str | None) -> str:
    """Upload a batch (preupload), then commit it with the given deletions; return the commit id."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    additions = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.source) for f in batch]
    kw = dict(repo_type=REPO_TYPE, revision=plan.revision, token=token)
    if additions:
        hub_call(f"uploading {len(additions)} file(s)",
                 lambda: api.preupload_lfs_files(plan.repo_id, additions=additions, free_memory=False, **kw), retry, token)
    operations = additions + [CommitOperationDelete(path_in_repo=p) for p in deletes]
    info = hub_call(f"committing '{message}'",
                    lambda: api.create_commit(plan.repo_id, operations, commit_message=message, **kw), retry, token)
    log.info("committed %s: %d file(s), %d deletion(s)", info.oid[:12] if info.oid else "?", len(additions), len(deletes))
    return info.oid


def _ensure_repo(api: Any, repo_id: str, private: bool, revision: str | None, retry: Retry, token: str | None) -> None:
    """Create the dataset repo (and the branch) unless they exist; warn when --private meets a public repo."""
    hub_call("creating the repo", lambda: api.create_repo(
        repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True, token=token), retry, token)
    if private:
        info = hub_call("reading the repo's settings", lambda: api.repo_info(repo_id, repo_type=REPO_TYPE, token=token),
                        retry, token)
        if not info.private:
            log.warning("%s already exists and is public: --private only applies to a new repo", repo_id)
    if revision:
        hub_call(f"creating branch '{revision}'", lambda: api.create_branch(
            repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True, token=token), retry, token)


def push_run(out_dir: str, repo_id: str, *, private: bool = False, revision: str | None = None,
             config_name: str | None = None, dry_run: bool = False, commit_files: int = 50,
             retry: Retry | None = None) -> PushPlan:
    """Push a finished run folder to a Hub dataset repo (module docstring); return what was (or would be) sent.

    Example: push_run("out/q", "me/q", dry_run=True).to_send
    """
    from huggingface_hub import HfApi, get_token

    from curate import __version__

    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"--repo must be OWNER/NAME, got '{repo_id}'", where="--repo")
    if commit_files < 1:
        raise ConfigError("commit_files must be at least 1", where="--commit-files")
    config = config_name or DEFAULT_CONFIG
    if config != DEFAULT_CONFIG and (not config.replace("_", "").replace("-", "").isalnum() or config == "data"):
        raise ConfigError(f"config name '{config}' must be letters, digits, '_' or '-' (and not 'data')", where="--config-name")
    retry = retry or Retry()
    run = load_run(out_dir)
    if not run.data_files:
        raise ConfigError("the run folder has no published shards (data/*.parquet)", where=out_dir)
    token = get_token()
    if token is None and not dry_run:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token, library_name="curate", library_version=__version__)
    with redacted_logs(token, loggers=("huggingface_hub",)):
        if not dry_run:
            _ensure_repo(api, repo_id, private, revision, retry, token)
        plan = plan_push(run, api, repo_id, revision, config, retry, token)
        if dry_run:
            return plan
        shards = [f for f in plan.to_send if f.path_in_repo.endswith(".parquet")]
        rest = [f for f in plan.to_send if not f.path_in_repo.endswith(".parquet")]
        batches = [shards[i:i + commit_files] for i in range(0, len(shards), commit_files)]
        for number, batch in enumerate(batches, 1):
            message = f"curate: {plan.config_name} shards, batch {number} of {len(batches)}"
            plan.commits.append(_commit(api, plan, batch, [], message, retry, token))
        deletes = list(plan.deletes)
        while len(deletes) > commit_files:  # stale shards beyond one commit's worth go first
            plan.commits.append(_commit(api, plan, [], deletes[:commit_files],
                                        f"curate: {plan.config_name} stale shards", retry, token))
            deletes = deletes[commit_files:]
        if rest or deletes:  # the card last, so it never names shards that are not committed yet
            plan.commits.append(_commit(api, plan, rest, deletes, f"curate: {plan.config_name} card and run record",
                                        retry, token))
        if not plan.commits:
            log.info("nothing to push: all %d files are already on the Hub with the same content", len(plan.files))
    return plan
