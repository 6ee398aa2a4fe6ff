"""The final formatting stage: TRL's explicit-prompt conversational columns, plus typed metadata.

`prompt` stays `list<struct<role, content>>`; `chosen` and `rejected` become one assistant turn
each (same type), which TRL's DPOTrainer reads as it is. Kept metadata, in this order: `id`,
`prompt_id`, scores and margin, `*_model` lineage, curriculum columns, then every method column
(`sr_*`, `cdr_*`, `ches_*`, `spa_*`, `donod_*`, `fe_*`, `uf_*`, `me_*`, `rps_*`, ...) and every
stage's row-failure column (`<stage id>_error`, whatever the id) in input order, then `keep`.
Everything else (candidate lists, raw source columns) is dropped. Leaves out: tokenisation (TRL's job).

Example: chosen "Sure." -> [{"role": "assistant", "content": "Sure."}]
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.contract import MESSAGE, MESSAGES, Params, Stage, StageOutput, require
from curate.errors import SchemaError
from curate.registry import register

LEADING = ["id", "prompt", "chosen", "rejected"]
METADATA = ["prompt_id", "chosen_score", "rejected_score", "margin", "chosen_model", "rejected_model",
            "curr_rank", "curr_stage"]
METHOD_PREFIXES = ("sr_", "cdr_", "ches", "ln_ches", "spa_", "donod_", "fe_", "uf_", "icai_", "scir_", "cream_",
                   "rationale", "pref_", "len_", "me_", "rps_", "near_dup_", "label_smoothing", "noise_",
                   "rso_", "ref_lp_", "ref_tokens_", "ref_logratio", "ref_rank_correct", "rd_", "difficulty_c",
                   "flip_loss_threshold", "ideal_ratio", "ideal_correct")


class TrlParams(Params):
    """Params of format.trl. Example: TrlParams(keep=["source"])"""

    keep: list[str] = Field(default_factory=list, description="extra input columns to keep at the end")
    metadata: bool = Field(True, description="keep score, lineage and method columns (False: only the four TRL columns)")


def assistant_turns(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Wrap each string as a one-turn assistant conversation.

    Example: assistant_turns(pa.array(["hi"])) -> [[{"role": "assistant", "content": "hi"}]]
    """
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    offsets = pa.array(np.arange(len(texts) + 1, dtype=np.int32))
    roles = pa.array(["assistant"] * len(texts), pa.string())
    return pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([roles, texts], fields=list(MESSAGE)), type=MESSAGES)


@register
class TrlFormat(Stage):
    """Write the TRL explicit-prompt conversational columns and the typed metadata (module docstring).

    Example: - stage: format.trl
    """

    name = "format.trl"
    kind = "map"
    Params = TrlParams

    def _kept(self, schema: pa.Schema) -> list[str]:
        missing = [c for c in self.params.keep if c not in schema.names]
        if missing:
            raise SchemaError(f"keep names columns the input does not have: {missing}", where=f"stage '{self.name}'")
        names = [n for n in METADATA if n in schema.names] if self.params.metadata else []
        if self.params.metadata:
            names += [n for n in schema.names if n not in names and n not in LEADING
                      and (n.startswith(METHOD_PREFIXES) or n.endswith(("_model", "_error")))]
        return names + [n for n in self.params.keep if n not in names and n not in LEADING]

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        require(schema, {"id": pa.string(), "prompt": MESSAGES, "chosen": pa.string(), "rejected": pa.string()}, self.name)
        fields = [pa.field("id", pa.string()), pa.field("prompt", MESSAGES),
                  pa.field("chosen", MESSAGES), pa.field("rejected", MESSAGES)]
        return pa.schema(fields + [schema.field(n) for n in self._kept(schema)])

    def apply(self, table: pa.Table, state: pa.Table | None = None) -> StageOutput:
        columns = {
            "id": table.column("id"),
            "prompt": table.column("prompt"),
            "chosen": assistant_turns(table.column("chosen")),
            "rejected": assistant_turns(table.column("rejected")),
        }
        columns.update({n: table.column(n) for n in self._kept(table.schema)})
        return StageOutput(pa.table(columns, schema=self.output_schema(table.schema)))
