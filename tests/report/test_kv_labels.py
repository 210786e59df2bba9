"""A KV-cache scheme whose keys or values are set apart says so in every label (runs are never told apart by #2)."""

from __future__ import annotations

from ptqlab.report.runs import describe_scheme, kv_sides


def test_key_and_value_entries_that_differ_from_the_section_are_named() -> None:
    kv = {"bits": 4, "granularity": "head", "symmetric": False, "group_size": None}
    assert kv_sides(kv) == ""
    assert kv_sides({**kv, "key": {"granularity": "head"}, "value": {"granularity": None}}) == ""  # the same: unsaid
    assert kv_sides({**kv, "key": {"granularity": "channel"}}) == " (K channel)"
    both = {**kv, "key": {"bits": 8, "granularity": "group", "group_size": 32}, "value": {"symmetric": True}}
    assert kv_sides(both) == " (K 8b group32; V sym)"
    per_token = describe_scheme({"kv_cache": kv})
    per_channel = describe_scheme({"kv_cache": {**kv, "key": {"granularity": "channel"}}})
    assert per_token == "KV4 head" and per_channel == "KV4 head (K channel)"
