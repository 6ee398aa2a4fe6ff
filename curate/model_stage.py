"""The hook every model stage shares: which models it loads, what keys its output, `open` / `close`.

A stage of kind `model` loads its models once per process through `LoadedModels` (the process
cache of `curate.backends.cache`: a judge reuses its generator's engine) and keys its output by
the identities of those models and the hashes of the texts that shape it (DESIGN.md §6).
`ModelStage` holds that boilerplate once:
- `self.models`: the stage's `LoadedModels`, made from `load_params()` (default: the params);
- `key_material()`: `Stage`'s material (name, version, params, seed) plus `key_texts()` plus
  `model_identity`, the identities of `model_refs()` (`curate.backends.params.identities`);
- `open()` loads every model of `model_refs()`; `close()` releases what the stage loaded.
A subclass names its models (`model_refs()`, default `[params.model]`); a stage that renders a
prompt template sets `self.template` (its hash enters the key as `template_hash`) and adds other
texts it hashes by overriding `key_texts()` (call `super()`). Leaves out: sentence embedders
(`curate.filters.near_dup.load_embedder`), which are not chat or scoring backends.

Example: @register class MyJudge(ModelStage): name = "judges.mine"; Params = MyParams  # MyParams(ModelParams) with `model`
"""
from __future__ import annotations

from typing import Any, ClassVar

from curate.backends.params import LoadedModels, identities
from curate.contract import Kind, Params, Stage


class ModelStage(Stage):
    """Base of the stages that run models (module docstring).

    Example: class Judge(ModelStage): name = "judges.x"; Params = XParams; uses_seed = True
    """

    kind: ClassVar[Kind] = "model"
    template: Any = None  # a `curate.judges.templates.Template` the stage renders, hashed into its key
    # CHES and DONOD have keyed their output by the bare identity string since they shipped; every
    # other stage by the list of identities. Kept so that existing runs resume instead of recomputing.
    identity_as_list: ClassVar[bool] = True

    def __init__(self, params: Params | None = None, *, seed: int = 0, stage_id: str | None = None):
        super().__init__(params, seed=seed, stage_id=stage_id)
        self.models = LoadedModels(self.load_params(), seed, pool_size=self.pool_size())

    # What a subclass says ----------------------------------------------------------------------
    def model_refs(self) -> list[str]:
        """The models this stage loads (model references, each once). Example: stage.model_refs() -> ['smollm2-135m-instruct']"""
        return [self.params.model]

    def key_texts(self) -> dict[str, Any]:
        """Hashes of the texts (templates, rubrics, constitutions) that shape the output, by key name.

        Example: judge.key_texts() -> {'template_hash': '5c1f…'}
        """
        return {"template_hash": self.template.hash} if self.template is not None else {}

    def load_params(self) -> Any:
        """The params the models load with (default: the stage's own). Example: stage.load_params().dtype"""
        return self.params

    def pool_size(self) -> int:
        """How many models this stage holds at once on one GPU (a generator's pool). Example: stage.pool_size() -> 1"""
        return 1

    # The boilerplate, once ---------------------------------------------------------------------
    def key_material(self) -> dict[str, Any]:
        """`Stage.key_material` plus `key_texts()` and the identities of `model_refs()`.

        Example: judge.key_material()["model_identity"] -> ['smollm2-135m-instruct@1dff70ef9e21']
        """
        refs = self.model_refs()
        found = identities(self.params, refs)
        identity = found if self.identity_as_list or found is None else found[0]
        return super().key_material() | self.key_texts() | {"model_identity": identity}

    def engines(self) -> set[tuple]:
        """The process-cache keys of the backends this stage runs on (`curate.backends.cache.backend_key`).

        Example: stage.engines() -> {('vllm', 'smollm2-135m-instruct', (('dtype', "'bfloat16'"), ...))}
        """
        from curate.backends.cache import backend_key

        options = self.models.options()
        return {backend_key(self.models.kind, model, options) for model in self.model_refs()}

    def engines_shared_across_threads(self) -> bool:
        """Whether this stage's backend takes calls from two threads at once into one batch (vLLM).

        Example: Responses(ResponsesParams(model="smollm2-135m-instruct")).engines_shared_across_threads() -> True
        """
        from curate.backends.registry import backend_entry

        return bool(getattr(backend_entry(self.models.kind).factory(), "shared_across_threads", False))

    def open(self) -> None:
        """Load every model of `model_refs()` (once per process). Example: stage.open()"""
        for model in self.model_refs():
            self.models.get(model)

    def close(self) -> None:
        """Release the models this stage loaded. Example: stage.close()"""
        self.models.release()


__all__ = ["ModelStage"]
