"""The transition bonus (models/transitions.py): what followed what in the training log, weighted on held-out time."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson
import torch

from consumers.model_info import checkpoint_info, info_lines
from models.checkpoint_io import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from models.dataset import load_events
from models.profile_model import ModelConfig, ProfileModel
from models.sequence_training import TrainConfig, train
from models.transitions import Transitions
from models.update_step import ProfileUpdater
from stream.generator import write_jsonl
from tests.helpers import DEVICE, record_batch


def test_counts_keep_each_rows_most_frequent_successors():
    a = np.array([0, 0, 0, 0, 0, 0, 2, 2, 1])
    b = np.array([3, 3, 3, 1, 1, 2, 0, 0, 1])
    table = Transitions.from_pairs(a, b, 4, per_row=2)
    rows = {r: dict(zip(table.cols[table.indptr[r]:table.indptr[r + 1]].tolist(),
                        table.counts[table.indptr[r]:table.indptr[r + 1]].tolist())) for r in range(4)}
    assert rows == {0: {3: 3.0, 1: 2.0}, 1: {1: 1.0}, 2: {0: 2.0}, 3: {}}  # 0 -> 2 (once) fell off the row


def test_scores_equal_a_dense_count_matrix():
    rng = np.random.default_rng(0)
    n = 30
    a, b = rng.integers(0, n, 400), rng.integers(0, n, 400)
    table = Transitions.from_pairs(a, b, n, per_row=n)
    dense = np.zeros((n, n))
    np.add.at(dense, (a, b), 1)
    current = torch.tensor([4, -1, 0, 29, 4, n + 3])  # -1 and n + 3: no row, no bonus
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0, 0.0, 1.0])
    expected = np.zeros((6, n))
    for u, c in enumerate(current.tolist()):
        if 0 <= c < n:
            expected[u] = weight[u].item() * np.log1p(dense[c])
    got = table.scores(weight, current, None, n)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    columns = torch.tensor([1, 5, 7, 20])  # a sorted subset of the classes, as training's candidates
    np.testing.assert_allclose(table.scores(weight, current, columns, 4).numpy(), expected[:, [1, 5, 7, 20]], rtol=1e-6)
    # One weight for everyone.
    np.testing.assert_allclose(table.scores(torch.tensor(2.0), current[:1], None, n).numpy(), 2 * np.log1p(dense[[4]]),
                               rtol=1e-6)


ITEMS = 120


def successor(item: int) -> int:
    return (item * 7 + 3) % ITEMS


def routes_log(users: int, seed: int, start_ts: int = 1_700_000_000_000) -> list[dict]:
    """Each user walks 5 steps of one fixed route through 120 items (item i is always followed by
    successor(i)), from a random start: the next item is certain, but a small GRU trained for a few
    epochs has not learned 120 transitions into its item vectors."""
    rng = np.random.default_rng(seed)
    events = []
    for u in range(users):
        item = int(rng.integers(ITEMS))
        t = start_ts + u * 600_000
        for step in range(5):
            events.append({"event_id": f"{seed}-{u}-{step}", "user_id": f"s{seed}u{u}", "type": "click",
                           "ts": t + step * 30_000, "item_id": f"i{item}", "category": f"c{item % 10}"})
            item = successor(item)
    return events


def test_the_weight_is_chosen_on_held_out_time_and_served_with_next_items(tmp_path):
    path = tmp_path / "routes.jsonl"
    write_jsonl(routes_log(users=600, seed=0), path)
    config = ModelConfig(hidden_size=16, item_buckets=512, category_buckets=64, query_buckets=64, dropout=0.0)
    model, vocab, _ = train(load_events([path]), config,
                            TrainConfig(epochs=2, batch_size=64, val_fraction=0.2, refit=False), torch.device(DEVICE))
    assert model.transition_weight[0] > 0  # the validation period ranked best with the counts
    table = model.transitions("item")
    assert table.counts.sum() > 0.95 * 600 * 4  # every training pair (a few events share a vocabulary row)

    save_checkpoint(tmp_path / "m.pt", model, "v1", {}, vocab)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(loaded.model.transition_weight, model.transition_weight.cpu())
    assert torch.equal(loaded.model.transitions("item").cols, table.cols.cpu())

    updater = ProfileUpdater(loaded, torch.device(DEVICE), max_event_bytes=65536, emit_embedding=False, next_items=1)
    starts = [5, 17, 64, 99]
    events = [{"event_id": f"n{k}", "user_id": f"new{k}", "type": "click", "ts": 1_800_000_000_000,
               "item_id": f"i{item}"} for k, item in enumerate(starts)]
    out = {k.decode(): orjson.loads(v) for k, v in updater.process(record_batch(events, topic="t", keys=None)).profiles}
    assert [out[f"new{k}"]["next_items"][0] for k in range(len(starts))] == [f"i{successor(i)}" for i in starts]


def test_a_format_8_checkpoint_loads_without_transitions(tmp_path):
    model = ProfileModel.fresh(replace(ModelConfig(hidden_size=8, item_buckets=64, category_buckets=32,
                                                   query_buckets=32), n_items=5))
    model.set_transitions(Transitions.from_pairs(np.array([0, 1]), np.array([1, 2]), 5), None)
    with torch.no_grad():
        model.transition_weight.fill_(3.0)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "v-old", {}, [f"i{n}" for n in range(5)])
    info = checkpoint_info(str(path))  # `profiles model info` says what the file holds
    assert info["format"] == CHECKPOINT_FORMAT and info["transitions"]["item"] == {"pairs": 2, "weight": 3.0}
    assert any(line.startswith("next-event transitions") and "item 2 pairs, weight 3" in line
               for line in info_lines(info))
    assert info["neighbours"] == {"sessions": 0, "weight": 0.0}  # none set: the votes are tested in test_neighbours
    payload = torch.load(path, weights_only=True)
    payload["format"] = 8
    del payload["state_dict"]["transition_weight"], payload["transitions"]
    torch.save(payload, path)
    loaded = load_checkpoint(path).model
    assert checkpoint_info(str(path))["format"] == 8
    s = torch.randn(2, loaded.config.state_size)
    current = torch.tensor([0, 1])
    with torch.no_grad():
        assert loaded.transition_weight.abs().sum() == 0 and len(loaded.transitions("item").cols) == 0
        with_table = model.item_scores(s, current=current)
        model.transition_weight.zero_()
        without = model.item_scores(s, current=current)
        torch.testing.assert_close(loaded.item_scores(s, current=current), without, rtol=0, atol=0)
    assert (with_table - without).abs().max() > 2  # 3 * log(2) on the one successor of each
