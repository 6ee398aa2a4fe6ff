"""The model-stage hook (curate.model_stage), the backend registry and the scripted `fake` backend (curate.testing)."""
from __future__ import annotations

import glob
import os

import pyarrow as pa
import pytest
from pydantic import Field

from curate.backends import cache, registry
from curate.backends.base import ChatRequest, Completion, GenerationParams, ScoreItem
from curate.backends.params import ModelParams
from curate.backends.registry import backend_entry, backend_names, register_backend, runs_in_process
from curate.config import load_pipeline
from curate.contract import MESSAGES, StageOutput
from curate.judges.templates import load_template
from curate.keys import chain_key
from curate.model_stage import ModelStage
from curate.testing import ScriptedBackend, use_scripted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The key material of every model stage in the shipped pipelines, hashed (chain_key("", material)),
# as computed before the hook replaced each stage's own key_material. A failure here means a change
# re-keys existing runs: they would recompute instead of resuming. If that is intended, update the
# value and say in the change which stage's key moved and why.
PINNED = {
    ("cdr.yaml", "cdr"): "03f468f39dc8b581ea96",
    ("hh_generate.yaml", "generate"): "162f8ef2431c466c909e",
    ("hh_generate.yaml", "judge"): "5c0360ed2c2375e512d2",
    ("icai.yaml", "propose"): "c8b0c79b1faeab68cef1",
    ("icai.yaml", "embed"): "3a3131a3e0dc084a2c93",
    ("icai.yaml", "vote"): "f2f4fef56407212e91a5",
    ("icai.yaml", "evaluate"): "4013540c92efa4293e88",
    ("multi_elo.yaml", "generate"): "0eb8d1619b663140cfd3",
    ("multi_elo.yaml", "judge"): "0c00235efca258bd47c7",
    ("multi_elo_pairwise.yaml", "judge_accuracy"): "e9f4ccf85c4f97ff5f77",
    ("multi_elo_pairwise.yaml", "judge_helpfulness"): "c185509f3540bdcd72c3",
    ("multi_elo_pairwise.yaml", "judge_language"): "33f2843de25d1ebbd68b",
    ("quickstart.yaml", "generate"): "162f8ef2431c466c909e",
    ("quickstart.yaml", "judge"): "5c0360ed2c2375e512d2",
    ("rationales.yaml", "rationale"): "efd70837e63659137828",
    ("rso.yaml", "policy"): "cc82aacb35cfd74336ad",
    ("rso.yaml", "cdr"): "03f468f39dc8b581ea96",
    ("ultrafeedback.yaml", "pool"): "bbad5513713e2c17fc9c",
    ("ultrafeedback.yaml", "judge"): "53abab620bade4ee86fb",
    ("ultrafeedback_self_reward.yaml", "pool"): "99b73f465072a91ea2fb",
    ("ultrafeedback_self_reward.yaml", "judge"): "5c0360ed2c2375e512d2",
}


def test_model_stage_keys_of_the_shipped_pipelines_are_pinned():
    found = {}
    for path in sorted(glob.glob(os.path.join(REPO, "pipelines", "*.yaml"))):
        for bound in load_pipeline(path).stages:
            if bound.stage.kind == "model":
                found[(os.path.basename(path), bound.id)] = chain_key("", bound.stage.key_material())
    assert found == PINNED


class EchoParams(ModelParams):
    model: str = Field(description="the model")
    second: str | None = Field(None, description="a second model")
    template: str = Field("self_reward", description="template")


class Echo(ModelStage):
    """A minimal judge written on the hook: a template, one or two models, a generated column."""

    name = "tests.echo"
    Params = EchoParams

    def __init__(self, params: EchoParams | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        self.template = load_template(self.params.template, required=("prompt", "response"))

    def model_refs(self) -> list[str]:
        return [self.params.model] + ([self.params.second] if self.params.second else [])

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        backend = self.models.get(self.params.model)
        requests = [ChatRequest([{"role": "user", "content": self.template.render(prompt=p[-1]["content"], response="")}],
                                GenerationParams(max_tokens=4)) for p in table.column("prompt").to_pylist()]
        texts = [c[0].text for c in backend.generate(requests)]
        return StageOutput(table.append_column("echo", pa.array(texts, pa.string())))


def test_hook_keys_texts_and_model_identities_and_loads_and_releases_every_model(tmp_path):
    stage = Echo(EchoParams(model="org/judge", second="org/other", backend="transformers"), seed=2)
    material = stage.key_material()
    assert material["template_hash"] == load_template("self_reward").hash
    assert material["model_identity"] == ["org/judge@main", "org/other@main"]
    assert material["name"] == "tests.echo" and stage.kind == "model"
    (tmp_path / "mine.txt").write_text("Grade {response} for {prompt}.")
    other = Echo(EchoParams(model="org/judge", second="org/other", backend="transformers", template=str(tmp_path / "mine.txt")))
    assert chain_key("", other.key_material()) != chain_key("", material)  # the template's text is in the key
    remote = Echo(EchoParams(model="org/judge", backend="openai", base_url="http://127.0.0.1:1/v1"))
    assert remote.key_material()["model_identity"] is None  # a server is keyed by its name and URL (params)

    judge, second = ScriptedBackend(lambda prompt: f"seen {len(prompt)} chars"), ScriptedBackend("unused")
    use_scripted(stage, {"org/judge": judge, "org/other": second})
    stage.open()
    assert {("fake", "org/judge"), ("fake", "org/other")} <= set(cache.loaded())  # open loads every model_refs()
    out = stage.apply(pa.table({"prompt": pa.array([[{"role": "user", "content": "q"}]], MESSAGES)}))
    shown = load_template("self_reward").render(prompt="q", response="")
    assert out.table.column("echo").to_pylist() == [f"seen {len(shown)} chars"]
    assert [r.messages[0]["content"] for r in judge.requests] == [shown] and second.requests == []
    stage.close()
    assert judge.closed and second.closed  # close released both, through the cache
    assert ("fake", "org/judge") not in cache.loaded() and ("fake", "org/other") not in cache.loaded()


def test_ches_and_donod_keep_their_identity_string_and_the_others_a_list():
    from curate.filters.ches import ChesScore, ChesScoreParams
    from curate.filters.donod import DonodScore, DonodScoreParams
    from curate.judges.self_reward import SelfRewardJudge, SelfRewardParams

    assert ChesScore(ChesScoreParams(model="org/m")).key_material()["model_identity"] == "org/m@main"
    assert DonodScore(DonodScoreParams(model="org/m")).key_material()["model_identity"] == "org/m@main"
    assert SelfRewardJudge(SelfRewardParams(model="org/m", backend="transformers")).key_material()["model_identity"] == ["org/m@main"]


def test_registry_names_what_runs_in_process_and_refuses_unknown_names(monkeypatch):
    assert set(backend_names()) >= {"vllm", "transformers", "openai", "embedder", "fake"}
    assert [runs_in_process(n) for n in ("vllm", "transformers", "openai", "fake", None, "tgi")] == \
        [True, True, False, False, False, False]
    assert backend_entry("openai").factory().__name__ == "OpenAIBackend"
    with pytest.raises(ValueError, match="unknown backend 'tgi' \\(vllm, transformers, openai"):
        backend_entry("tgi")
    with pytest.raises(ValueError, match="module:callable"):
        register_backend("tgi", "no_colon", in_process=False)
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))  # the registration below ends with the test
    register_backend("tgi", "curate.testing:ScriptedBackend", in_process=False)  # called as ScriptedBackend(model)
    built = cache.open_backend("tgi", "hello")  # a registered name goes through the one cache
    assert isinstance(built, ScriptedBackend) and cache.open_backend("tgi", "hello") is built
    assert built.generate([ChatRequest([{"role": "user", "content": "x"}], GenerationParams(max_tokens=1))])[0][0].text == "hello"
    cache.release_backend(built)


def test_scripted_backend_replies_samples_failures_and_logprobs():
    backend = ScriptedBackend(lambda prompt: Completion(None, None, 0, 0, "s", error="boom") if "fail" in prompt else prompt.upper())
    out = backend.generate([ChatRequest([{"role": "user", "content": "two words"}], GenerationParams(max_tokens=4, n=3)),
                            ChatRequest([{"role": "user", "content": "fail"}], GenerationParams(max_tokens=4))])
    assert [c.text for c in out[0]] == ["TWO WORDS"] * 3 and out[0][0].n_tokens == 2 and out[1][0].error == "boom"
    listed = ScriptedBackend(lambda prompt: ["a", "b c"]).generate([ChatRequest([{"role": "user", "content": "x"}],
                                                                                GenerationParams(max_tokens=4, n=2))])
    assert [(c.text, c.n_tokens) for c in listed[0]] == [("a", 1), ("b c", 2)]
    scorer = ScriptedBackend(logprobs={("q", "a"): [-1.0, -0.5]}, default=[-3.0])
    got = scorer.logprobs([ScoreItem([{"role": "user", "content": "q"}], "a"), ScoreItem([], "b", prompt_text="rendered")])
    assert [g.tolist() for g in got] == [[-1.0, -0.5], [-3.0]] and len(scorer.seen) == 2
    with pytest.raises(KeyError, match="no log-probs scripted"):
        ScriptedBackend(logprobs={}).logprobs([ScoreItem([{"role": "user", "content": "q"}], "a")])
    with pytest.raises(AssertionError, match="no reply scripted"):
        ScriptedBackend().generate([ChatRequest([{"role": "user", "content": "x"}], GenerationParams(max_tokens=1))])


def test_fake_refuses_a_model_nobody_scripted_and_a_rescript_replaces_the_cached_one():
    with pytest.raises(ValueError, match="no scripted backend for model 'org/nobody'"):
        cache.open_backend("fake", "org/nobody")
    first, second = ScriptedBackend("one"), ScriptedBackend("two")
    a = use_scripted(Echo(EchoParams(model="org/again", backend="transformers")), first)
    a.open()
    b = use_scripted(Echo(EchoParams(model="org/again", backend="transformers")), second)  # a later test's script
    table = pa.table({"prompt": pa.array([[{"role": "user", "content": "q"}]], MESSAGES)})
    assert b.apply(table).table.column("echo").to_pylist() == ["two"] and first.closed
    b.close()
