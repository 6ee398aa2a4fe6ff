"""Bad inputs: a corpus of broken pipelines and data files, each refused with one short located error.

Every case checks a non-zero exit code, a single `error:` line on stderr that names where the
problem is (file:line for YAML and JSONL, the stage id for schema problems, the path for output
problems, the flag for command-line problems), a did-you-mean where one makes sense, and no
traceback. `--debug` brings the traceback back. A failed run loses nothing an earlier run finished.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.contract import Stage, StageOutput
from curate.registry import register

GOOD = '{"prompt": "hi"}\n{"prompt": "there"}\n'
OK_STAGES = "stages:\n  - stage: filters.nonempty\n"


def _pipeline(body: str = OK_STAGES, data: str = "in.jsonl") -> str:
    """A pipeline reading `data` into `out`, with `body` from line 3 on."""
    return f"source: {{path: {data}}}\noutput: out\n{body}"


@dataclass
class Case:
    """One broken input: the pipeline text, extra files, CLI arguments and what the error must say."""

    yaml: str | None
    expect: list[str]
    exit_code: int = 2
    files: dict[str, str | bytes] = field(default_factory=lambda: {"in.jsonl": GOOD})
    args: list[str] = field(default_factory=lambda: ["run", "p.yaml"])


CASES = {
    # Pipeline files -----------------------------------------------------------------------------
    "unknown_stage": Case(
        _pipeline("stages:\n  - stage: filters.nonempty\n  - stage: filters.lenght\n"),
        ["p.yaml:5", "unknown stage 'filters.lenght'", "did you mean 'filters.length'?"]),
    "misspelt_param": Case(
        _pipeline("stages:\n  - stage: filters.length\n    params:\n      columns: [prompt]\n      max_char: 5\n"),
        ["p.yaml:7", "no parameter 'max_char'", "did you mean 'max_chars'?"]),
    "wrong_param_type": Case(
        _pipeline("stages:\n  - stage: filters.length\n    params:\n      columns: [prompt]\n      max_chars: many\n"),
        ["p.yaml:7", "parameter 'max_chars'", "valid integer"]),
    "params_check_across_fields": Case(
        _pipeline("stages:\n  - stage: filters.length\n    params: {columns: [prompt]}\n"),
        ["p.yaml:5", "stage 'filters.length' params:", "give min_chars, max_chars or both"]),
    "unknown_top_level_key": Case(
        "name: x\nsorce: {path: in.jsonl}\noutput: out\n",
        ["p.yaml:2", "unknown key 'sorce'", "did you mean 'source'?"]),
    "unknown_source_key": Case(
        "source:\n  path: in.jsonl\n  lmit: 5\noutput: out\n",
        ["p.yaml:3", "unknown key 'source.lmit'", "did you mean 'limit'?"]),
    "missing_source": Case("name: x\noutput: out\n", ["p.yaml:1", "missing required key 'source'"]),
    "duplicate_yaml_key": Case(
        "source: {path: in.jsonl}\noutput: out\nsource: {path: other.jsonl}\n",
        ["p.yaml:3", "key 'source' is given twice (first on line 1)"]),
    "yaml_syntax_error": Case(
        _pipeline("stages:\n  - stage: [filters.length\n  - x: y\n"), ["p.yaml:5", "expected ',' or ']'"]),
    "yaml_tab_indent": Case("source: {path: in.jsonl}\n\toutput: out\n", ["p.yaml:2", "'\\t'"]),
    "yaml_python_tag": Case(
        "source: {path: in.jsonl}\noutput: !!python/object/new:os.getcwd []\n",
        ["p.yaml:2", "YAML tags are not allowed", "!!python/object/new:os.getcwd"]),
    "yaml_local_tag": Case(
        "source: !include other.yaml\noutput: out\n", ["p.yaml:1", "YAML tags are not allowed (!include)"]),
    "recursive_alias": Case(
        "anchors: &loop [*loop]\nsource: {path: in.jsonl}\noutput: out\n", ["p.yaml:1", "unknown key 'anchors'"]),
    "empty_yaml": Case("", ["p.yaml: the pipeline file is empty"]),
    "comments_only_yaml": Case("# nothing here yet\n", ["p.yaml: the pipeline file is empty"]),
    "yaml_is_a_list": Case("- source: {path: in.jsonl}\n", ["p.yaml:1", "must be a mapping, found list"]),
    "yaml_is_a_scalar": Case("just some words\n", ["p.yaml:1", "must be a mapping, found str"]),
    "yaml_not_utf8": Case(None, ["p.yaml:2", "not valid UTF-8"],
                          files={"in.jsonl": GOOD, "p.yaml": b"source: {path: in.jsonl}\n# caf\xe9\noutput: out\n"}),
    "pipeline_file_missing": Case(None, ["nope.yaml", "no such pipeline file"], args=["run", "nope.yaml"]),
    "duplicate_stage_ids": Case(
        _pipeline("stages:\n  - stage: filters.nonempty\n    id: clean\n  - stage: filters.length\n"
                  "    id: clean\n    params: {max_chars: 9}\n"),
        ["p.yaml:7", "stage id 'clean' is used twice"]),
    "bad_stage_id": Case(
        _pipeline("stages:\n  - stage: filters.nonempty\n    id: my stage\n"), ["p.yaml:5", "stage id 'my stage'"]),
    # Schema: the stage chain against the data's columns -----------------------------------------
    "stage_needs_missing_column": Case(
        _pipeline("stages:\n  - stage: filters.nonempty\n  - stage: filters.length\n    id: reply_len\n"
                  "    params: {columns: [chosen], max_chars: 10}\n"),
        ["p.yaml:5", "stage 'reply_len'", "needs column 'chosen'"]),
    "stage_needs_missing_column_validate": Case(
        _pipeline("stages:\n  - stage: filters.length\n    id: reply_len\n    params: {columns: [chosen], max_chars: 10}\n"),
        ["p.yaml:4", "stage 'reply_len'", "needs column 'chosen'"], args=["validate", "p.yaml"]),
    "stage_needs_missing_column_plan": Case(
        _pipeline("stages:\n  - stage: pairs.from_scores\n    id: pairs\n"),
        ["p.yaml:4", "stage 'pairs'", "scores"], args=["plan", "p.yaml"]),
    "inputs_name_missing_column": Case(
        _pipeline("stages:\n  - stage: filters.nonempty\n    inputs: {prompt: question}\n"),
        ["p.yaml:4", "inputs:", "'question'"]),
    # Data files -----------------------------------------------------------------------------------
    "empty_data_file": Case(_pipeline(), ["in.jsonl: file is empty"], 3, {"in.jsonl": ""}),
    "non_utf8_line": Case(
        _pipeline(), ["in.jsonl:3", "not valid UTF-8"], 3,
        {"in.jsonl": b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "\xff\xfe"}\n'}),
    "non_utf8_line_validate": Case(
        _pipeline(), ["in.jsonl:2", "not valid UTF-8"], 3,
        {"in.jsonl": b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'}, ["validate", "p.yaml"]),
    "invalid_json_line": Case(
        _pipeline(), ["in.jsonl:3", "not valid JSON"], 3,
        {"in.jsonl": '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n{"prompt": "d"}\n'}),
    "json_line_not_an_object": Case(
        _pipeline(), ["in.jsonl:2", "JSON list, expected an object"], 3, {"in.jsonl": '{"prompt": "a"}\n["b"]\n'}),
    "null_prompt": Case(
        _pipeline(), ["in.jsonl:3", "'prompt' is null"], 3,
        {"in.jsonl": '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": null}\n'}),
    "prompt_of_wrong_type": Case(
        _pipeline(), ["in.jsonl", "'prompt' must be a string", "int64"], 3, {"in.jsonl": '{"prompt": 1}\n{"prompt": 2}\n'}),
    "no_prompt_column": Case(
        _pipeline(), ["in.jsonl", "no 'prompt' column", "text"], 3, {"in.jsonl": '{"text": "a"}\n'}),
    "repeated_row_id": Case(
        _pipeline(), ["in.jsonl:3", "'id' 'x' is not unique", "in.jsonl:1"], 3,
        {"in.jsonl": '{"id": "x", "prompt": "a"}\n{"id": "y", "prompt": "b"}\n{"id": "x", "prompt": "c"}\n'}),
    "null_row_id": Case(
        _pipeline(), ["in.jsonl:2", "'id' is null"], 3,
        {"in.jsonl": '{"id": "x", "prompt": "a"}\n{"id": null, "prompt": "b"}\n'}),
    "missing_input_file": Case(_pipeline(data="nope.jsonl"), ["nope.jsonl", "no such file or folder"], 3, {}),
    "not_a_parquet_file": Case(
        _pipeline(data="in.parquet"), ["in.parquet", "not a readable Parquet file"], 3, {"in.parquet": "hello"}),
    "not_a_gzip_file": Case(
        _pipeline(data="in.jsonl.gz"), ["in.jsonl.gz", "not a gzip file"], 3, {"in.jsonl.gz": "hello"}),
    # Output folder -------------------------------------------------------------------------------
    "output_is_a_file": Case(_pipeline(), ["afile", "is a file, not a folder"], 2,
                             {"in.jsonl": GOOD, "afile": "x"}, ["run", "p.yaml", "--out", "afile"]),
    "output_under_a_file": Case(_pipeline(), ["afile/sub", "cannot create the output folder"], 2,
                                {"in.jsonl": GOOD, "afile": "x"}, ["run", "p.yaml", "--out", "afile/sub"]),
    "no_output_folder": Case("source: {path: in.jsonl}\n", ["p.yaml", "no output folder"]),
    # Command line --------------------------------------------------------------------------------
    "refresh_unknown_stage": Case(
        _pipeline(), ["--refresh", "'nonemtpy'", "did you mean 'nonempty'?"],
        args=["run", "p.yaml", "--refresh", "nonemtpy"]),
    "set_without_equals": Case(
        _pipeline(), ["--set", "'source.path'", "key.path=value"], args=["run", "p.yaml", "--set", "source.path"]),
    "set_below_a_scalar": Case(
        _pipeline(), ["--set", "'output.x'", "'output' is neither a mapping"], args=["run", "p.yaml", "--set", "output.x=1"]),
    "set_past_the_list_end": Case(
        _pipeline(), ["--set", "'stages.5'", "nor a list that long"], args=["validate", "p.yaml", "--set", "stages.5=x"]),
    "set_misspelt_key": Case(
        _pipeline(), ["--set source.lmit=5: unknown key 'source.lmit'", "did you mean 'limit'?"],
        args=["validate", "p.yaml", "--set", "source.lmit=5"]),
    "set_misspelt_param": Case(
        _pipeline(), ["--set stages.0.params.column=[x]:", "no parameter 'column'", "did you mean 'columns'?"],
        args=["validate", "p.yaml", "--set", "stages.0.params.column=[x]"]),
    "set_wrong_type": Case(
        _pipeline(), ["--set seed=abc:", "'seed'", "valid integer"], args=["run", "p.yaml", "--set", "seed=abc"]),
}



def _rows(*rows: dict) -> str:
    """JSONL text of the given rows."""
    return "".join(json.dumps(r) + "\n" for r in rows)


_DEEP = "[" * 3000 + "]" * 3000
_GEN = "stages:\n  - stage: generators.responses\n    params: {model: %s, generation: {%s}%s}\n"
_VALIDATE = ["validate", "p.yaml"]

CASES.update({
    # Pipeline files: shapes and values -----------------------------------------------------------
    "stage_not_a_mapping": Case(_pipeline("stages:\n  - filters.nonempty\n"), ["p.yaml:4", "'stages.0'", "valid dictionary"]),
    "stages_is_a_mapping": Case(_pipeline("stages: {a: 1}\n"), ["p.yaml:3", "'stages'", "valid list"]),
    "params_is_a_list": Case(_pipeline("stages:\n  - stage: filters.nonempty\n    params: [1, 2]\n"),
                             ["p.yaml:5", "'stages.0.params'", "valid dictionary"]),
    "source_is_a_string": Case("source: in.jsonl\noutput: out\n", ["p.yaml:1", "'source'", "valid dictionary"]),
    "source_path_and_hub": Case("source: {path: in.jsonl, hub: a/b}\noutput: out\n", ["p.yaml:1", "exactly one of 'path' or 'hub'"]),
    "source_neither_path_nor_hub": Case("source: {limit: 3}\noutput: out\n", ["p.yaml:1", "exactly one of 'path' or 'hub'"]),
    "seed_not_an_integer": Case("source: {path: in.jsonl}\noutput: out\nseed: abc\n", ["p.yaml:3", "'seed'", "valid integer"]),
    "limit_zero": Case("source: {path: in.jsonl, limit: 0}\noutput: out\n", ["p.yaml:1", "'source.limit'", "greater than or equal to 1"]),
    "part_rows_zero": Case("source: {path: in.jsonl, part_rows: 0}\noutput: out\n", ["p.yaml:1", "'source.part_rows'"]),
    "sample_of_zero_rows": Case("source: {path: in.jsonl, sample: {n: 0}}\noutput: out\n", ["p.yaml:1", "'source.sample.n'"]),
    "unknown_format": Case("source: {path: in.jsonl, format: csv}\noutput: out\n", ["p.yaml:1", "'source.format'", "'jsonl'"]),
    "unknown_parse": Case("source: {path: in.jsonl, parse: xml}\noutput: out\n", ["p.yaml:1", "'source.parse'", "'hh'"]),
    "max_cell_bytes_zero": Case("source: {path: in.jsonl, max_cell_bytes: 0}\noutput: out\n", ["p.yaml:1", "'source.max_cell_bytes'"]),
    "unknown_executor": Case("source: {path: in.jsonl}\noutput: out\nexecutor: {kind: spark}\n", ["p.yaml:3", "'executor.kind'", "'dask'"]),
    "dask_with_zero_workers": Case("source: {path: in.jsonl}\noutput: out\nexecutor: {kind: dask, workers: 0}\n",
                                   ["p.yaml:3", "'executor.workers'"]),
    "stage_id_source": Case(_pipeline("stages:\n  - stage: filters.nonempty\n    id: source\n"), ["p.yaml:5", "stage id 'source'"]),
    "stage_id_escapes_the_folder": Case(_pipeline("stages:\n  - stage: filters.nonempty\n    id: ../../x\n"),
                                        ["p.yaml:5", "stage id '../../x'", "names folders of the run"]),
    "stage_id_too_long": Case(_pipeline("stages:\n  - stage: filters.nonempty\n    id: %s\n" % ("a" * 300)),
                              ["p.yaml:5", "at most 64"]),
    "inputs_value_not_a_string": Case(_pipeline("stages:\n  - stage: filters.nonempty\n    inputs: {prompt: [a]}\n"),
                                      ["p.yaml:5", "'stages.0.inputs.prompt'", "valid string"]),
    "outputs_collide_with_a_column": Case(_pipeline("stages:\n  - stage: filters.nonempty\n    outputs: {prompt: id}\n"),
                                          ["p.yaml:4", "duplicate names ['id']"]),
    "name_is_a_list": Case("name: [a]\nsource: {path: in.jsonl}\noutput: out\n", ["p.yaml:1", "'name'", "valid string"]),
    "yaml_nested_too_deeply": Case("source: {path: in.jsonl}\noutput: out\nx: " + _DEEP + "\n", ["p.yaml", "nested too deeply"]),
    "generation_without_max_tokens": Case(_pipeline(_GEN % ("smollm2-135m-instruct", "", "")),
                                          ["p.yaml:5", "needs parameter 'generation.max_tokens'"]),
    "negative_temperature": Case(_pipeline(_GEN % ("smollm2-135m-instruct", "max_tokens: 4, temperature: -1", "")),
                                 ["p.yaml:5", "'generation.temperature'", "greater than or equal to 0"]),
    "greedy_with_n_above_one": Case(_pipeline(_GEN % ("smollm2-135m-instruct", "max_tokens: 4, n: 2, temperature: 0", "")),
                                    ["p.yaml:5", "n is 2 with temperature 0", "identical"]),
    "openai_without_base_url": Case(_pipeline(_GEN % ("m", "max_tokens: 4", ", backend: openai")),
                                    ["p.yaml:5", "the openai backend needs base_url"]),
    "unknown_backend": Case(_pipeline(_GEN % ("m", "max_tokens: 4", ", backend: tgi")), ["p.yaml:5", "'backend'", "'openai'"]),
    "trust_remote_code_not_a_flag": Case(_pipeline(_GEN % ("m", "max_tokens: 4", ", trust_remote_code: sure")),
                                         ["p.yaml:5", "'trust_remote_code'", "valid boolean"]),
    "unknown_model": Case(_pipeline(_GEN % ("nope-model", "max_tokens: 4", "")), ["p.yaml:4", "unknown model 'nope-model'"],
                          args=_VALIDATE),
    "missing_gguf_file": Case(_pipeline(_GEN % ("nope.gguf", "max_tokens: 4", "")), ["p.yaml:4", "nope.gguf: no such .gguf file"],
                              args=_VALIDATE),
    "missing_judge_template": Case(
        _pipeline("stages:\n  - stage: judges.self_reward\n    params: {model: smollm2-135m-instruct, template: nope.txt,"
                  " generation: {max_tokens: 8}}\n"),
        ["nope.txt", "no such template", "self_reward"], files={"in.jsonl": _rows({"prompt": "a", "responses": ["x"]})},
        args=_VALIDATE),
    # Schema ---------------------------------------------------------------------------------------
    "format_trl_before_pairs": Case(_pipeline("stages:\n  - stage: format.trl\n"), ["p.yaml:4", "stage 'trl'", "needs column 'chosen'"]),
    "range_over_a_text_column": Case(_pipeline("stages:\n  - stage: filters.range\n    params: {column: prompt, min: 1}\n"),
                                     ["p.yaml:4", "stage 'range'", "column 'prompt'", "expected double"]),
    "scores_that_are_strings": Case(
        _pipeline("stages:\n  - stage: pairs.from_scores\n"), ["p.yaml:4", "column 'scores'", "expected a list of numbers"],
        files={"in.jsonl": _rows({"prompt": "a", "responses": ["x", "y"], "scores": ["a", "b"]})}),
    # Data files: the contract's shapes ------------------------------------------------------------
    "cell_over_max_cell_bytes": Case(
        "source: {path: in.jsonl, max_cell_bytes: 10}\noutput: out\n", ["in.jsonl:2", "column 'prompt'", "50 bytes"], 3,
        {"in.jsonl": _rows({"prompt": "a"}, {"prompt": "x" * 50})}),
    "list_over_max_list_items": Case(
        "source: {path: in.jsonl, max_list_items: 2}\noutput: out\n", ["in.jsonl:1", "column 'tags'", "3 items"], 3,
        {"in.jsonl": _rows({"prompt": "a", "tags": [1, 2, 3]})}),
    "json_nested_too_deeply": Case(_pipeline(), ["in.jsonl:1", "nested more than 64 levels"], 3,
                                   {"in.jsonl": '{"prompt": "a", "x": ' + _DEEP + '}\n'}),
    "folder_without_data_files": Case(_pipeline(data="d"), ["d: matches no .parquet or .jsonl files"], 3, {"d/notes.txt": "x"}),
    "glob_matching_nothing": Case(_pipeline(data="'*.nothing'"), ["*.nothing: matches no .parquet or .jsonl files"], 3),
    "unknown_role": Case(_pipeline(), ["in.jsonl:2", "role 'wizard'", "system, user, assistant, tool"], 3,
                         {"in.jsonl": _rows({"prompt": [{"role": "user", "content": "a"}]},
                                            {"prompt": [{"role": "wizard", "content": "b"}]})}),
    "number_where_text_is_expected": Case(_pipeline(), ["in.jsonl:1", "'prompt' message contents must be text", "int64"], 3,
                                          {"in.jsonl": _rows({"prompt": [{"role": "user", "content": 5}]})}),
    "message_without_content": Case(_pipeline(), ["in.jsonl:2", "'prompt' has a message without content"], 3,
                                    {"in.jsonl": _rows({"prompt": [{"role": "user", "content": "a"}]},
                                                       {"prompt": [{"role": "user", "content": None}]})}),
    "conversation_with_no_turns": Case(_pipeline(), ["in.jsonl:2", "'prompt' has no messages"], 3,
                                       {"in.jsonl": _rows({"prompt": [{"role": "user", "content": "a"}]}, {"prompt": []})}),
    "chosen_is_a_number": Case(_pipeline(), ["in.jsonl", "'chosen' must be a string", "int64"], 3,
                               {"in.jsonl": _rows({"prompt": "a", "chosen": 5, "rejected": "b"})}),
    "responses_not_a_list": Case(_pipeline(), ["in.jsonl", "'responses' must be a list"], 3,
                                 {"in.jsonl": _rows({"prompt": "a", "responses": "b"})}),
    "responses_without_text": Case(_pipeline(), ["in.jsonl", "'responses' must hold strings or {text, ...} structs"], 3,
                                   {"in.jsonl": _rows({"prompt": "a", "responses": [{"model": "m"}]})}),
    "response_text_is_a_number": Case(_pipeline(), ["in.jsonl", "'responses' texts must be text", "int64"], 3,
                                      {"in.jsonl": _rows({"prompt": "a", "responses": [{"text": 1}]})}),
    "id_is_an_object": Case(_pipeline(), ["in.jsonl:1", "'id' must be a string or an integer"], 3,
                            {"in.jsonl": _rows({"id": {"a": 1}, "prompt": "a"})}),
    "types_differ_across_rows": Case(_pipeline(), ["in.jsonl:1", "do not share one type per column"], 3,
                                     {"in.jsonl": _rows({"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]})}),
    "later_row_column_with_mixed_types": Case(  # once read with the first row's columns only: 'chosen' vanished
        _pipeline(), ["in.jsonl:1", "do not share one type per column"], 3,
        {"in.jsonl": _rows({"prompt": "a"}, {"prompt": "b", "chosen": [{"role": "assistant", "content": ""},
                                                                     {"role": "assistant", "content": 0}]})}),
    "number_past_64_bits": Case(_pipeline(), ["in.jsonl:1", "does not fit in 64 bits"], 3,
                                # a type change sends the block to the strict reader, where 2**64 raised OverflowError
                                {"in.jsonl": '{"prompt": "a", "n": 18446744073709551616, "x": true}\n{"prompt": "b", "x": 1}\n'}),
    "json_null_line": Case(_pipeline(), ["in.jsonl:2", "'prompt' is null"], 3, {"in.jsonl": '{"prompt": "a"}\nnull\n'}),
    "json_nan_prompt": Case(_pipeline(), ["in.jsonl", "'prompt' must be a string", "double"], 3, {"in.jsonl": '{"prompt": NaN}\n'}),
    "gzip_bytes_named_jsonl": Case(_pipeline(), ["in.jsonl:1", "not valid UTF-8"], 3,
                                   {"in.jsonl": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(200, 256))}),
    # Command line and run folders -----------------------------------------------------------------
    "plan_of_a_missing_file": Case(None, ["nope.yaml", "no such pipeline file"], args=["plan", "nope.yaml"]),
    "report_of_a_folder_that_is_no_run": Case(None, ["notrun", "not a finished curate run folder"],
                                              files={"notrun/x.txt": "x"}, args=["report", "notrun"]),
    "trl_check_of_a_folder_without_shards": Case(None, ["notrun", "no Parquet shards found"],
                                                 files={"notrun/x.txt": "x"}, args=["validate", "--trl", "notrun"]),
    "push_to_a_repo_without_owner": Case(None, ["--repo", "must be OWNER/NAME"], files={"notrun/x.txt": "x"},
                                         args=["push", "notrun", "--repo", "noslash"]),
    "push_with_an_escaping_config_name": Case(None, ["--config-name", "config name '../x'"], files={"notrun/x.txt": "x"},
                                              args=["push", "notrun", "--repo", "a/b", "--config-name", "../x"]),
    "push_of_a_folder_that_is_no_run": Case(None, ["notrun", "not a finished curate run folder"], files={"notrun/x.txt": "x"},
                                            args=["push", "notrun", "--repo", "a/b", "--dry-run"]),
})

def _write(tmp_path: Path, case: Case) -> None:
    if case.yaml is not None:
        (tmp_path / "p.yaml").write_text(case.yaml)
    for name, content in case.files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)


def _error_line(stderr: str) -> str:
    """The whole of stderr, which must be exactly one short `error:` line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert len(lines[0]) < 500, lines[0]
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_located_error(name, tmp_path, monkeypatch):
    case = CASES[name]
    _write(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["-q", *case.args])
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == case.exit_code, result.output
    line = _error_line(result.stderr)
    for text in case.expect:
        assert text in line, f"{text!r} not in {line!r}"


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 80


# Subprocess: what a user at a terminal sees -----------------------------------------------------


def _curate(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curate.cli", *args], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def test_yaml_code_tag_is_refused_and_never_runs(tmp_path):
    (tmp_path / "in.jsonl").write_text(GOOD)
    (tmp_path / "p.yaml").write_text('source: {path: in.jsonl}\n'
                                     'output: !!python/object/apply:os.system ["echo hi > pwned.txt"]\n')
    for command in ("run", "validate", "plan"):
        proc = _curate(tmp_path, command, "p.yaml")
        assert proc.returncode == 2, proc.stderr
        line = _error_line(proc.stderr)
        assert "p.yaml:2" in line and "YAML tags are not allowed (!!python/object/apply:os.system)" in line
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "pwned.txt").exists() and "hi" not in proc.stdout
    assert not (tmp_path / "out").exists()


def test_nested_aliases_do_not_hang(tmp_path):
    """Eight levels of nine aliases each: 9**8 key paths if every alias were walked again."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]" for p, k in zip("abcdefg", "bcdefgh")]
    (tmp_path / "in.jsonl").write_text(GOOD)
    (tmp_path / "p.yaml").write_text("\n".join(levels) + "\nsource: {path: in.jsonl}\noutput: out\n")
    proc = _curate(tmp_path, "validate", "p.yaml", timeout=30)
    assert proc.returncode == 2
    assert "p.yaml:1: unknown key 'a'" in _error_line(proc.stderr)


def test_data_error_without_quiet_ends_with_the_error_line_and_no_traceback(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    (tmp_path / "p.yaml").write_text(_pipeline())
    proc = _curate(tmp_path, "run", "p.yaml")
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "in.jsonl:2" in last and "UTF-8" in last


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "in.jsonl").write_text(GOOD)
    (tmp_path / "p.yaml").write_text(_pipeline("stages:\n  - stage: filters.lenght\n"))
    proc = _curate(tmp_path, "--debug", "run", "p.yaml")
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ConfigError: p.yaml:4: unknown stage 'filters.lenght'" in proc.stderr


# A failed run loses nothing an earlier run finished ---------------------------------------------


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under a folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_scored(scored: Path, *extra: str):
    result = CliRunner().invoke(main, ["-q", "run", str(scored), *extra])
    assert "Traceback" not in result.output
    return result


def test_broken_data_after_a_good_run_keeps_the_published_output(scored):
    out = scored.parent / "out"
    assert _run_scored(scored).exit_code == 0
    before = _snapshot(out)
    assert any(p.startswith("data/train-") for p in before) and any(p.startswith("parts/") for p in before)
    data = scored.parent / "data" / "scored_candidates.jsonl"
    rows = data.read_text().count("\n")
    with open(data, "a") as f:  # someone appends a row by hand and forgets a quote
        f.write('{"prompt": "one more, "responses": [], "scores": []}\n')
    result = _run_scored(scored)
    assert result.exit_code == 3
    assert f"scored_candidates.jsonl:{rows + 1}" in _error_line(result.stderr)
    assert _snapshot(out) == before


class _Explode(Stage):
    """A map stage that raises on its second part while `armed` (a stage bug met mid-run)."""

    name = "tests.explode_on_second_part"
    kind = "map"
    armed = True
    calls = 0

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        type(self).calls += 1
        if type(self).armed and type(self).calls == 2:
            raise ValueError("boom")
        return StageOutput(table)


register(_Explode)


def test_stage_failing_mid_run_keeps_finished_parts_and_the_published_output(scored, monkeypatch):
    out = scored.parent / "out"
    assert _run_scored(scored).exit_code == 0
    before = _snapshot(out)
    published = {p: h for p, h in before.items() if p.startswith("data/")}
    # The user adds a stage at the end; every earlier segment is cached, the new one fails on part 1 of 3.
    scored.write_text(scored.read_text() + "  - stage: tests.explode_on_second_part\n    id: explode\n")
    monkeypatch.setattr(_Explode, "calls", 0)
    result = _run_scored(scored)
    assert result.exit_code == 4, result.output
    line = _error_line(result.stderr)
    assert "stage 'explode'" in line and "part 1" in line and "ValueError: boom" in line
    assert "finished parts are kept" in line
    after = _snapshot(out)
    assert {p: h for p, h in after.items() if p.startswith("data/")} == published
    unchanged = {p: h for p, h in before.items() if p.startswith("parts/")}
    assert {p: after.get(p) for p in unchanged} == unchanged  # every committed part and manifest as it was
    plan = json.loads((out / "plan.json").read_text())
    new_key = plan["segments"][-1]["key"]
    assert f"parts/{new_key}/part-00000.parquet" in after  # the part finished before the failure is committed
    assert f"parts/{new_key}/part-00001.parquet" not in after
    # Fixed: the run resumes, computing only the two parts that were missing.
    monkeypatch.setattr(_Explode, "armed", False)
    monkeypatch.setattr(_Explode, "calls", 0)
    assert _run_scored(scored).exit_code == 0
    assert _Explode.calls == 2
    stats = json.loads((out / "stats.json").read_text())
    explode = next(s for s in stats["stages"] if s["stage_id"] == "explode")
    assert (explode["parts_computed"], explode["parts_cached"]) == (2, 1)
    assert after[f"parts/{new_key}/part-00000.parquet"] == _snapshot(out)[f"parts/{new_key}/part-00000.parquet"]
