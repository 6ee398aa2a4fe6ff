"""`curate push` against a loopback Hub (tests/hub_stub.py) on 127.0.0.1, through huggingface_hub itself.

Each push runs `python -m curate.cli push` in a subprocess with HF_ENDPOINT pointing at the stub
(huggingface_hub reads its endpoint when imported), Xet off (the stub speaks the LFS protocol),
and the library's debug logging on, so the token checks read every log line it writes.
What this does not show is in README.md ("Sharing").
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from curate.card import LOCAL_REF
from curate.config import load_pipeline
from curate.hub import PushFile, Retry, same_content
from curate.redaction import redact, redacted_logs
from curate.runner import run_pipeline
from tests.hub_stub import HubStub, git_blob_id

TOKEN = "hf_PLANTEDtokenDoNotLeak0123456789abcdef"
REPO = "me/scored-dpo"


@pytest.fixture
def hub():
    with HubStub(TOKEN) as stub:
        yield stub


@pytest.fixture
def run_dir(scored: Path) -> Path:
    run_pipeline(load_pipeline(str(scored)))
    return scored.parent / "out"


def push(hub: HubStub, tmp_path: Path, run: Path, *args: str, token: str | None = TOKEN,
         debug: bool = True) -> subprocess.CompletedProcess:
    """`curate push` in a subprocess; `debug` adds curate's --debug (tracebacks instead of one-line errors)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"), HF_DEBUG="1",
               HF_HUB_VERBOSITY="debug", HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    command = [sys.executable, "-m", "curate.cli"] + (["--debug"] if debug else []) + ["push", str(run), "--repo", REPO]
    return subprocess.run(command + list(args),
                          env=env, capture_output=True, text=True, timeout=300)


def shards(run: Path) -> dict[str, bytes]:
    return {f"data/{p.name}": p.read_bytes() for p in sorted((run / "data").glob("*.parquet"))}


def front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---\n", 2)[1])


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error (debug logs of connections closing may follow it)."""
    return next(line for line in result.stderr.splitlines() if line.startswith("error: "))


def requests_to(hub: HubStub, fragment: str, method: str | None = None, since: int = 0) -> list:
    return [r for r in hub.requests[since:] if fragment in r.path and (method is None or r.method == method)]


def assert_token_only_in_authorization(hub: HubStub, outputs: list[str], folders: list[Path]) -> None:
    for request in hub.requests:
        assert TOKEN not in request.path and TOKEN.encode() not in request.body
        for name, value in request.headers.items():
            if name.lower() == "authorization":
                assert value == f"Bearer {TOKEN}"
            else:
                assert TOKEN not in value, name
    for text in outputs:
        assert TOKEN not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path
    for repo in hub.repos.values():
        for files in repo.branches.values():
            assert all(TOKEN.encode() not in data for data in files.values())


def test_push_sends_shards_in_bounded_commits_then_the_card_and_nothing_on_a_second_push(hub, tmp_path, run_dir):
    first = push(hub, tmp_path, run_dir, "--commit-files", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    local = shards(run_dir)
    assert len(local) == 3
    commits = hub.commits(REPO)
    # shards in commits of at most 2, then the card and the run record
    assert [c["summary"] for c in commits] == ["curate: default shards, batch 1 of 2", "curate: default shards, batch 2 of 2",
                                             "curate: default card and run record"]
    shard_ops = [op for c in commits[:2] for op in c["operations"]]
    assert [len(c["operations"]) for c in commits[:2]] == [2, 1]
    assert {op["path"]: op["oid"] for op in shard_ops} == {p: hashlib.sha256(b).hexdigest() for p, b in local.items()}
    assert all(op["key"] == "lfsFile" for op in shard_ops)
    assert sorted(op["path"] for op in commits[2]["operations"]) == ["README.md", "pipeline.yaml", "plan.json", "stats.json"]
    remote = hub.files(REPO)
    for path, data in local.items():
        assert remote[path] == data
    for name in ("pipeline.yaml", "plan.json", "stats.json"):
        assert remote[name] == (run_dir / name).read_bytes()
    # the card is the run's card, with the repo id in its snippets
    card = remote["README.md"].decode()
    assert card == (run_dir / "README.md").read_text().replace(LOCAL_REF, REPO)
    config = front_matter(card)["configs"][0]
    pattern = config["data_files"][0]["path"]
    assert config["config_name"] == "default" and config["data_files"][0]["split"] == "train"
    assert sorted(p for p in remote if fnmatch(p, pattern)) == sorted(local)
    # LFS uploads go to the upload URL without the token, one per shard
    puts = requests_to(hub, "/lfs-upload/", "PUT")
    assert len(puts) == 3 and not any("authorization" in {k.lower() for k in r.headers} for r in puts)
    assert "sent 7 file(s), 0 unchanged, 0 deleted, in 3 commit(s)" in first.stdout

    seen = len(hub.requests)
    second = push(hub, tmp_path, run_dir, "--commit-files", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(hub.commits(REPO)) == 3
    for fragment in ("/lfs-upload/", "/preupload/", "/commit/", "/lfs/objects/batch"):
        assert requests_to(hub, fragment, since=seen) == [], fragment
    assert "sent 0 file(s), 7 unchanged" in second.stdout
    # the library's debug logging was on (HF_DEBUG prints every request as curl): the check below reads it
    assert "curl" in first.stderr and "DEBUG" in first.stderr
    assert_token_only_in_authorization(hub, [first.stdout, first.stderr, second.stdout, second.stderr],
                                       [run_dir, tmp_path / "hf-home"])


def test_429_and_412_and_5xx_are_retried_and_retry_after_is_honoured(hub, tmp_path, run_dir):
    hub.fail("POST", "/commit/", 429, headers={"Retry-After": "2"})
    hub.fail("POST", "/commit/", 412)
    hub.fail("GET", "/tree/", 503)
    hub.fail("POST", "/preupload/", 429, headers={"Retry-After": "0"})  # retried inside huggingface_hub
    result = push(hub, tmp_path, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    commits = requests_to(hub, "/commit/", "POST")
    assert [r.status for r in commits] == [429, 412, 200, 200]
    assert commits[1].at - commits[0].at >= 2.0  # Retry-After: 2
    assert [r.status for r in requests_to(hub, "/tree/")] == [503, 200]
    assert "HTTP 429, retrying in 2.0s" in result.stderr and "HTTP 412, retrying in" in result.stderr
    assert set(shards(run_dir)) <= set(hub.files(REPO))
    assert_token_only_in_authorization(hub, [result.stdout, result.stderr], [run_dir])


def test_an_interrupted_push_resumes_and_sends_no_committed_shard_again(hub, tmp_path, run_dir):
    hub.fail("POST", "/commit/", 403, after=1)  # the second shard commit is refused: the push stops there
    broken = push(hub, tmp_path, run_dir, "--commit-files", "1", debug=False)
    assert broken.returncode == 1
    assert error_line(broken).startswith(
        "error: committing 'curate: default shards, batch 2 of 3' failed: HTTP 403")
    local = shards(run_dir)
    names = sorted(local)
    assert sorted(p for p in hub.files(REPO) if p.endswith(".parquet")) == names[:1]
    uploaded = {r.path.rsplit("/", 1)[1] for r in requests_to(hub, "/lfs-upload/")}
    seen = len(hub.requests)

    resumed = push(hub, tmp_path, run_dir, "--commit-files", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    new_ops = [op["path"] for c in hub.commits(REPO)[1:] for op in c["operations"]]
    assert names[0] not in new_ops and names[1] in new_ops and names[2] in new_ops
    # shard 2 was uploaded before its commit was refused: the LFS store already has it, so only shard 3 goes up
    again = {r.path.rsplit("/", 1)[1] for r in requests_to(hub, "/lfs-upload/", since=seen)}
    assert again == {hashlib.sha256(local[names[2]]).hexdigest()} and not again & uploaded
    assert {p: hub.files(REPO)[p] for p in names} == local
    assert_token_only_in_authorization(hub, [broken.stdout, broken.stderr, resumed.stdout, resumed.stderr], [run_dir])


def test_stale_shards_of_an_earlier_push_are_deleted_with_the_new_card(hub, tmp_path, scored, run_dir):
    assert push(hub, tmp_path, run_dir).returncode == 0
    old = set(shards(run_dir))
    run_pipeline(load_pipeline(str(scored), ["source.part_rows=12"]))  # the same run folder, now 2 shards
    new = set(shards(run_dir))
    assert len(old) == 3 and len(new) == 2 and not old & new
    result = push(hub, tmp_path, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    last = hub.commits(REPO)[-1]
    assert sorted(op["path"] for op in last["operations"] if op["key"] == "deletedFile") == sorted(old)
    remote = hub.files(REPO)
    pattern = front_matter(remote["README.md"].decode())["configs"][0]["data_files"][0]["path"]
    assert {p for p in remote if fnmatch(p, pattern)} == new


def test_config_name_and_revision_go_to_their_folder_and_branch_and_merge_the_card(hub, tmp_path, run_dir):
    assert push(hub, tmp_path, run_dir).returncode == 0
    main_commits = len([c for c in hub.commits(REPO) if c["branch"] == "main"])
    result = push(hub, tmp_path, run_dir, "--config-name", "small", "--revision", "dev")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([c for c in hub.commits(REPO) if c["branch"] == "main"]) == main_commits
    dev = hub.files(REPO, "dev")
    for path, data in shards(run_dir).items():
        assert dev[path.replace("data/", "small/")] == data
    assert dev["small/plan.json"] == (run_dir / "plan.json").read_bytes()
    meta = front_matter(dev["README.md"].decode())
    assert [(c["config_name"], c["data_files"][0]["path"]) for c in meta["configs"]] == [
        ("default", "data/train-*"), ("small", "small/train-*")]
    assert sorted(i["config_name"] for i in meta["dataset_info"]) == ["default", "small"]
    assert f'load_dataset("{REPO}", "small", split="train")' in dev["README.md"].decode()
    # the new shards were already in the LFS store (same bytes as data/): nothing was uploaded again
    assert len(requests_to(hub, "/lfs-upload/")) == 3


def test_private_creates_a_private_repo_and_warns_on_an_existing_public_one(hub, tmp_path, run_dir):
    assert push(hub, tmp_path, run_dir, "--private").returncode == 0
    assert hub.repos[REPO].private
    hub.repos[REPO].private = False
    again = push(hub, tmp_path, run_dir, "--private", debug=False)
    assert again.returncode == 0
    assert f"{REPO} already exists and is public: --private only applies to a new repo" in again.stderr


def test_dry_run_lists_and_changes_nothing(hub, tmp_path, run_dir):
    dry = push(hub, tmp_path, run_dir, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.count("would send") == 8  # 7 files and the summary line
    assert REPO not in hub.repos and not requests_to(hub, "", "POST") and not requests_to(hub, "", "PUT")
    assert push(hub, tmp_path, run_dir).returncode == 0
    seen = len(hub.requests)
    again = push(hub, tmp_path, run_dir, "--dry-run")
    assert again.stdout.count("unchanged") == 7 + 1
    assert not requests_to(hub, "", "POST", since=seen)


def test_a_wrong_or_missing_token_is_a_one_line_error_without_the_token(hub, tmp_path, run_dir):
    wrong = "hf_wrongTOKENwrongTOKEN0000000000"
    result = push(hub, tmp_path, run_dir, token=wrong, debug=False)
    assert result.returncode == 1
    last = error_line(result)
    assert last.startswith("error: creating the repo failed: HTTP 401") and "HF_TOKEN" in last
    assert wrong not in result.stdout + result.stderr
    missing = push(hub, tmp_path, run_dir, token=None, debug=False)
    assert missing.returncode == 1
    assert error_line(missing) == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`"


def test_a_token_written_into_the_pipeline_stops_the_push_before_anything_is_sent(hub, tmp_path, scored):
    text = scored.read_text().replace("description: ", f"description: leaked {TOKEN} ", 1)
    scored.write_text(text)
    run_pipeline(load_pipeline(str(scored)))
    result = push(hub, tmp_path, scored.parent / "out", debug=False)
    assert result.returncode == 1
    assert "README.md contains your Hugging Face token" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert hub.commits(REPO) == [] and not requests_to(hub, "/preupload/") and not requests_to(hub, "/lfs-upload/")


# Units ----------------------------------------------------------------------------------------


def test_retry_delay_honours_retry_after_and_grows_without_it():
    retry = Retry(backoff=1.0, max_backoff=8.0, max_retry_after=30.0)
    assert retry.delay(0, 5.0) == 5.0 and retry.delay(3, 0.0) == 0.0 and retry.delay(0, 100.0) == 30.0
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 8.0)]:
        assert ceiling / 2 <= retry.delay(attempt, None) <= ceiling


def test_log_records_are_scrubbed_of_the_token(caplog):
    import logging

    logger = logging.getLogger("curate.test_push")
    with caplog.at_level(logging.DEBUG), redacted_logs(TOKEN):
        logger.warning("header was Bearer %s", TOKEN)
    assert TOKEN not in caplog.text and "Bearer ***" in caplog.text
    assert redact(f"x {TOKEN} y") == "x *** y" and redact("x") == "x"


def test_same_content_compares_lfs_sha256_and_git_blob_ids(tmp_path):
    class Lfs:
        def __init__(self, sha256):
            self.sha256 = sha256

    class Entry:
        def __init__(self, size, blob_id, lfs=None):
            self.size, self.blob_id, self.lfs = size, blob_id, lfs

    shard = tmp_path / "s.parquet"
    shard.write_bytes(b"PAR1 data")
    local = PushFile("data/s.parquet", str(shard), 9)
    assert same_content(local, Entry(9, "x", Lfs(hashlib.sha256(b"PAR1 data").hexdigest())))
    assert not same_content(local, Entry(9, "x", Lfs(hashlib.sha256(b"PAR1 dat4").hexdigest())))
    card = PushFile("README.md", b"---\n", 4)
    assert same_content(card, Entry(4, git_blob_id(b"---\n")))
    assert not same_content(card, Entry(4, git_blob_id(b"--- ")))
    assert not same_content(card, None) and not same_content(card, Entry(5, git_blob_id(b"---\n")))
    assert re.fullmatch(r"[0-9a-f]{40}", git_blob_id(b""))
