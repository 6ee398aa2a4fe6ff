"""Keys (canonical hashing) and the data contract helpers."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest

from curate.contract import MESSAGES, conform, keep_all, mark_dropped, messages_content, messages_text, with_fields
from curate.errors import StageError
from curate.keys import canonical_json, chain_key, digest, row_seed


def test_canonical_json_sorts_keys_and_refuses_unhashable():
    assert canonical_json({"b": 1, "a": [1.5, None]}) == '{"a":[1.5,null],"b":1}'
    with pytest.raises(TypeError, match="non-finite"):
        canonical_json({"x": math.nan})
    with pytest.raises(TypeError, match="object"):
        canonical_json({"x": object()})


def test_chain_key_depends_on_parent_and_material():
    a = chain_key("p", {"x": 1})
    assert a == chain_key("p", {"x": 1})
    assert a != chain_key("q", {"x": 1})
    assert a != chain_key("p", {"x": 2})
    assert len(a) == 20
    assert digest("a", "bc") != digest("ab", "c")


def test_row_seed_is_stable_and_scoped():
    assert row_seed("r1", "pairs", 0) == row_seed("r1", "pairs", 0)
    assert row_seed("r1", "pairs", 0) != row_seed("r1", "pairs", 1)
    assert row_seed("r1", "pairs", 0) != row_seed("r2", "pairs", 0)


def test_messages_text_handles_slices_nulls_and_empty_lists():
    arr = pa.array([[{"role": "user", "content": "hi"}],
                    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], None, []], MESSAGES)
    assert messages_text(arr).to_pylist() == ["user\x1fhi", "user\x1fa\x1eassistant\x1fb", None, ""]
    assert messages_content(arr.slice(1)).to_pylist() == ["a\nb", None, ""]


def test_mark_dropped_keeps_the_first_reason():
    keep, reason = keep_all(3)
    keep, reason = mark_dropped(keep, reason, pa.array([True, False, None]), "first")
    keep, reason = mark_dropped(keep, reason, pa.array([True, True, False]), "second")
    assert keep.to_pylist() == [False, False, False]
    assert reason.to_pylist() == ["first", "second", "first"]


def test_with_fields_replaces_in_place_and_appends():
    s = with_fields(pa.schema([("a", pa.int64()), ("b", pa.int64())]), {"a": pa.string(), "c": pa.bool_()})
    assert s.names == ["a", "b", "c"] and s.field("a").type == pa.string()


def test_conform_orders_columns_and_refuses_undeclared_ones():
    schema = pa.schema([("a", pa.int64()), ("b", pa.string())])
    t = pa.table({"b": ["x"], "a": [1]})
    assert conform(t, schema, "s").schema == schema
    with pytest.raises(StageError, match="undeclared \\['c'\\]"):
        conform(t.append_column("c", pa.array([1])), schema, "s")


def test_execution_fields_stay_out_of_the_key_and_are_listed():
    from curate.backends.params import ModelParams
    from curate.contract import Params, execution_field
    from curate.filters.near_dup import NearDupParams

    class P(Params):
        a: int = 1
        batch: int = execution_field(8, ge=1, description="rows per batch")

    assert P.execution_params() == {"batch"}
    assert P(batch=2).key_params() == P(batch=64).key_params() == {"a": 1}
    with pytest.raises(ValueError):
        P(batch=0)  # the field's own constraints still apply
    assert ModelParams.execution_params() == {"batch_size", "max_concurrency", "timeout", "max_retries",
                                              "gpu_memory_utilization", "trust_remote_code"}
    assert NearDupParams.execution_params() == {"batch_size", "block", "device"}
