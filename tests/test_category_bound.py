"""--max-categories: an event whose category would be one more than the bound is dead-lettered as too_many_categories,
the same ones whatever the batches, and no profile names a category past it."""

from __future__ import annotations

import base64

import orjson

from consumers.replay import replay
from stream.events import TOO_MANY_CATEGORIES
from stream.generator import generate
from stream.settings import Settings
from tests.helpers import DEVICE


def replayed(settings: Settings, lines: list[bytes], tmp_path, name: str, batch: int) -> tuple[dict, list[dict]]:
    src, out, dlq = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.out.jsonl", tmp_path / f"{name}.dlq.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    replay(settings, [str(src)], "jsonl", str(out), None, False, None, str(dlq), batch, show_progress=False)
    profiles = {p["user_id"]: p for p in map(orjson.loads, out.read_bytes().splitlines())}
    for p in profiles.values():
        p.pop("updated_at")  # the wall clock at publishing
    return profiles, [orjson.loads(line) for line in dlq.read_bytes().splitlines()] if dlq.exists() else []


def test_categories_past_the_bound_are_dead_lettered_the_same_whatever_the_batches(tmp_path):
    events = generate(30, 600, seed=2).events
    order = list(dict.fromkeys(e["category"] for e in events if e.get("category")))  # in order of appearance
    bound = len(order) - 3
    lines = [orjson.dumps(e) for e in events]
    settings = Settings(device=DEVICE, emit_embedding=False, max_categories=bound)
    profiles, dead = replayed(settings, lines, tmp_path, "one", 50_000)
    past = set(order[bound:])  # the three to appear last
    assert [d["reason"] for d in dead] == [TOO_MANY_CATEGORIES] * sum(e.get("category") in past for e in events)
    assert "--max-categories" in dead[0]["detail"]
    refused = {orjson.loads(base64.b64decode(d["value_base64"]))["category"] for d in dead}  # the records as they came
    assert refused == past
    named = {c["category"] for p in profiles.values() for c in p["top_categories"]}
    assert named and not named & past
    split, dead_split = replayed(settings, lines, tmp_path, "split", 37)
    assert [(d["line"], d["reason"]) for d in dead_split] == [(d["line"], d["reason"]) for d in dead]
    assert not {c["category"] for p in split.values() for c in p["top_categories"]} & past
    unbounded, none = replayed(Settings(device=DEVICE, emit_embedding=False, max_categories=0), lines, tmp_path,
                               "unbounded", 50_000)
    assert not none and {c["category"] for p in unbounded.values() for c in p["top_categories"]} & past
