"""Registry of stages by short name (`filters.length`), built-ins plus the `curate.stages` entry points.

Built-in stage modules are imported on first lookup, so `import curate` stays cheap. A third-party
package adds stages with an entry point in the group `curate.stages` whose value is a `Stage`
subclass (`mypkg.stages:MyFilter`). Leaves out: instantiation and params validation (`curate.config`).

Example: get_stage("filters.length") -> <class 'curate.filters.text.LengthFilter'>
"""
from __future__ import annotations

import difflib
import importlib
import logging
from importlib.metadata import entry_points

from curate.contract import Stage
from curate.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "curate.stages"
BUILTIN_MODULES = (
    "curate.stages_core",
    "curate.filters.text",
    "curate.filters.dedup",
    "curate.filters.noise",
    "curate.filters.spa",
    "curate.filters.ches",
    "curate.filters.near_dup",
    "curate.filters.donod",
    "curate.filters.ranking_difficulty",
    "curate.filters.rps",
    "curate.filters.length_bias",
    "curate.pairing",
    "curate.generators.rso",
    "curate.formatting",
    "curate.generators.responses",
    "curate.judges.self_reward",
    "curate.judges.pairwise",
    "curate.judges.ultrafeedback",
    "curate.judges.multi_elo",
    "curate.judges.cdr",
    "curate.judges.scir",
    "curate.judges.cream_stages",
    "curate.judges.rationale",
    "curate.judges.icai_stages",
    "curate.judges.icai_fit",
    "curate.judges.constitution",
)

_STAGES: dict[str, type[Stage]] = {}
_loaded = False


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage findable by its `name`.

    Example: @register class MyFilter(Stage): name = "filters.mine"; kind = "filter"
    """
    existing = _STAGES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"stage name '{cls.name}' is taken by {existing.__module__}.{existing.__name__}")
    _STAGES[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break built-in stages
            log.warning("could not load stage entry point %s (%s): %s", ep.name, ep.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            log.warning("entry point %s does not name a curate Stage subclass; ignored", ep.value)
            continue
        register(cls)


def available() -> dict[str, type[Stage]]:
    """Every registered stage, built-in and third-party, by name.

    Example: "filters.length" in available() -> True
    """
    _load_all()
    return dict(sorted(_STAGES.items()))


def get_stage(name: str, where: str | None = None) -> type[Stage]:
    """The stage class for a short name, or a ConfigError with the closest names.

    Example: get_stage("filters.lenght") -> ConfigError "... did you mean 'filters.length'?"
    """
    _load_all()
    try:
        return _STAGES[name]
    except KeyError:
        close = difflib.get_close_matches(name, _STAGES, n=1, cutoff=0.6)
        raise ConfigError(f"unknown stage '{name}'", where=where, hint=close[0] if close else None) from None
