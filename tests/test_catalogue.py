"""The item catalogue: a model reads an item it was not trained on (or one trained in another category) as unknown."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson
import torch

from models.catalogue import ItemCatalogue
from models.checkpoint_io import LoadedModel, load_checkpoint, save_checkpoint
from models.dataset import load_events
from models.features import build_features, category_keys, item_hashes
from models.profile_model import ProfileModel, forget_items
from models.sequence_training import TrainConfig, train
from models.update_step import ProfileUpdater
from stream.generator import write_jsonl
from tests.helpers import DEVICE, record_batch
from tests.test_training import TINY, cyclic_log

SALT = 0


def catalogue_of(pairs: list[tuple[str | None, str | None]]) -> ItemCatalogue:
    items, cats = zip(*pairs)
    return ItemCatalogue.from_events(item_hashes(list(items), SALT), category_keys(list(cats), SALT + 1))


def known(catalogue: ItemCatalogue, pairs: list[tuple[str | None, str | None]]) -> list[bool]:
    items, cats = zip(*pairs)
    return catalogue.known(item_hashes(list(items), SALT), category_keys(list(cats), SALT + 1)).tolist()


def test_an_item_is_known_in_the_category_it_was_mostly_seen_in():
    catalogue = catalogue_of([("tank", "fish"), ("tank", "fish"), ("tank", "garden"), ("hose", "garden"),
                              ("plain", None), (None, "fish")])
    assert len(catalogue) == 3  # tank, hose, plain; the event without an item adds none
    assert known(catalogue, [("tank", "fish"), ("tank", "garden"), ("hose", "garden"), ("hose", "fish")]) == [
        True, False, True, False]  # tank was mostly fish: in garden it names another product
    # Without a category on either side there is nothing to disagree: the id decides.
    assert known(catalogue, [("tank", None), ("plain", "fish"), ("plain", None)]) == [True, True, True]
    # Never seen: unknown whatever its category. No item: nothing to forget.
    assert known(catalogue, [("seeds", "garden"), ("seeds", None), (None, "garden"), (None, None)]) == [
        False, False, True, True]
    # A tie goes to the larger key, so the catalogue does not depend on the order of the log.
    for tie in (catalogue_of([("x", "a"), ("x", "b")]), catalogue_of([("x", "b"), ("x", "a")])):
        assert tie.categories.tolist() == [max(category_keys(["a", "b"], SALT + 1).tolist())]
    # An empty catalogue knows no item.
    assert known(catalogue_of([(None, "a")]), [("x", "a"), (None, "a")]) == [False, True]


def test_features_read_an_unknown_item_as_no_item():
    catalogue = catalogue_of([("a", "cat-a"), ("b", "cat-b")])
    n = 4
    f = build_features(np.ones(n, dtype=np.int64), np.array(["a", "a", "zz", "b"], dtype=object),
                       np.array(["cat-a", "cat-b", "cat-a", "cat-b"], dtype=object), np.full(n, 5.0),
                       np.array([None] * n, dtype=object), np.zeros(n), np.zeros(n, dtype=bool),
                       item_buckets=512, category_buckets=32, query_buckets=64, hash_seed=SALT,
                       device=torch.device("cpu"), item_index={"a": 0, "b": 1}, catalogue=catalogue)
    assert f.item_vocab.tolist() == [0, -1, -1, 1]
    assert (f.item[[1, 2]] == 0).all() and (f.item[[0, 3]] > 0).all()


def test_a_served_item_outside_the_catalogue_reads_as_unknown(tmp_path):
    """Two ids the model cannot know (one trained in another category, one never seen) leave a user in the same
    state; an item it knows, in its category, does not; the catalogue survives the checkpoint."""
    path = tmp_path / "cycle.jsonl"
    write_jsonl(cyclic_log(users=6, steps=12), path)
    model, vocab, _ = train(load_events([path]), replace(TINY, unknown_items=0.2), TrainConfig(epochs=2, batch_size=4),
                            torch.device(DEVICE))
    assert model.catalogue is not None and len(model.catalogue) == 6
    save_checkpoint(tmp_path / "m.pt", model, "v1", {}, vocab)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert np.array_equal(loaded.model.catalogue.hashes, model.catalogue.hashes)
    assert np.array_equal(loaded.model.catalogue.categories, model.catalogue.categories)

    def states(m: ProfileModel) -> dict[str, list[float]]:
        updater = ProfileUpdater(LoadedModel(m, "v1", True, {}, vocab), torch.device(DEVICE), max_event_bytes=65536,
                                 emit_embedding=True)
        events = [{"event_id": f"e-{user}", "user_id": user, "type": "click", "ts": 1_700_000_000_000,
                   "item_id": item, "category": "cat-b", "price": 11.0}
                  for user, item in (("other-category", "a"), ("never-seen", "zz"), ("known", "b"))]
        return {k.decode(): orjson.loads(v)["embedding"]
                for k, v in updater.process(record_batch(events, topic="t", keys=None)).profiles}

    served = states(loaded.model)
    assert served["other-category"] == served["never-seen"]
    assert served["known"] != served["never-seen"]
    # A model without a catalogue (checkpoints before format 19) reads every id as the item it hashes to.
    loaded.model.catalogue = None
    unchecked = states(loaded.model)
    assert unchecked["other-category"] != unchecked["never-seen"]
    assert unchecked["known"] == served["known"]


def test_training_reads_a_share_of_items_as_unknown_and_serving_none():
    model = ProfileModel(replace(TINY, unknown_items=0.25))
    n = 20_000
    f = build_features(np.ones(n, dtype=np.int64), np.array(["a"] * n, dtype=object), np.array(["c"] * n, dtype=object),
                       np.full(n, 5.0), np.array([None] * n, dtype=object), np.zeros(n), np.zeros(n, dtype=bool),
                       item_buckets=512, category_buckets=32, query_buckets=64, hash_seed=SALT,
                       device=torch.device("cpu"), item_index={"a": 0})
    torch.manual_seed(0)
    forgotten = forget_items(f, 0.25)
    share = float((forgotten.item == 0).float().mean())
    assert 0.23 < share < 0.27
    assert torch.equal(forgotten.item == 0, forgotten.item_vocab == -1)
    model.eval()
    assert torch.equal(model.embed(f), model.embed(f))  # no draws outside training
    model.train()
    assert not torch.equal(model.embed(f), model.embed(f))


def test_field_heads_see_half_their_examples_with_every_item_unknown(tmp_path):
    """The field stage's domain randomisation: the same users, cuts and labels, about half of the states from a
    replay in which the model knows no item; the model's catalogue is its own again afterwards."""
    from models.field_training import FOREIGN_ITEMS_SHARE, collect, default_cuts, with_foreign_items

    path = tmp_path / "cycle.jsonl"
    write_jsonl(cyclic_log(users=24, steps=20), path)
    log = load_events([path])
    model, vocab, _ = train(log, TINY, TrainConfig(epochs=1, batch_size=4), torch.device(DEVICE))
    loaded = LoadedModel(model, "v1", True, {}, vocab)
    cuts = default_cuts(log.events.ts, 4)
    parts = collect(loaded, log, cuts, torch.device(DEVICE))
    catalogue = model.catalogue
    mixed = with_foreign_items(parts, loaded, log, cuts, torch.device(DEVICE), torch.Generator().manual_seed(0))
    assert model.catalogue is catalogue
    model.catalogue = ItemCatalogue.empty()
    foreign = collect(loaded, log, cuts, torch.device(DEVICE))
    model.catalogue = catalogue
    picked = 0
    for part, other, mix in zip(parts, foreign, mixed):
        for name in ("purchase", "event", "purchase_hours", "event_hours", "target_weight", "cut"):
            assert torch.equal(getattr(mix, name), getattr(part, name)), name
        from_foreign = (mix.state == other.state).all(dim=1)
        assert (from_foreign | (mix.state == part.state).all(dim=1)).all()
        assert not torch.equal(part.state, other.state)  # the unknown items moved the states
        picked += int(from_foreign.sum())
    total = sum(len(p.user) for p in parts)
    assert abs(picked / total - FOREIGN_ITEMS_SHARE) < 0.15
