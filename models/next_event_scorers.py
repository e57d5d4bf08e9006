"""The GRU as a next-event scorer, and event logs as evaluation sequences.

The GRU scorer answers the same protocol as the baselines in `models.next_event_evaluation`:
for every test position t >= 1 it scores the next event from the user's state after
the training events (carried over) and test events 0..t-1.
"""

from __future__ import annotations

import numpy as np
import torch

from models.dataset import HOUR_MS, EventLog
from models.next_event_evaluation import (
    CHUNK_ELEMENTS, NextEventPredictions, Sequences, prefix_state, ranks_from_scores, targets,
)
from models.features import category_keys_and_buckets, vocab_rows
from models.profile_model import ProfileModel
from models.sequence_training import final_states, recent_categories, run_chunks
from models.sequence_data import prepare


def sequences_from_log(log_: EventLog, item_index: dict[str, int], model: ProfileModel) -> Sequences:
    """Per-user arrays in the evaluation's vocabulary: items by the model's item vocabulary,
    categories by the model's category hash buckets (so every scorer ranks the same classes)."""
    ev, cfg = log_.events, model.config
    cut = log_.start[1:]
    items = vocab_rows(ev.item_id, item_index)
    _, buckets = category_keys_and_buckets(ev.category, cfg.category_buckets, cfg.hash_seed + 1)
    categories = buckets - 1  # bucket 0 (none) -> -1
    return Sequences(items=np.split(items, cut), categories=np.split(categories, cut),
                     types=np.split(ev.type_idx, cut), ts=np.split(ev.ts, cut),
                     n_items=max(len(item_index), 1), n_categories=cfg.category_buckets - 1)


def aligned_train(train_log: EventLog, test_log: EventLog) -> EventLog | None:
    """The training events of the test users, or None when no test user has any (session datasets)."""
    keep = np.isin(train_log.users, test_log.users)
    return train_log.subset_users(keep) if keep.any() else None


class GRUScorer:
    """Scores next events with a trained ProfileModel; rank_next needs the raw logs it was built with."""

    name = "gru"

    def __init__(self, model: ProfileModel, item_vocab: list[str], test_log: EventLog,
                 train_log: EventLog | None, device: torch.device, batch_users: int = 1024) -> None:
        self.model = model.eval()
        self.item_vocab = item_vocab
        self.test_log = test_log
        self.train_log = train_log  # training events of the test users, or None
        self.device = device
        self.batch_users = batch_users

    def fit(self, train: Sequences) -> None:  # trained by `profiles train`
        return None

    def initial_states(self) -> tuple[torch.Tensor, np.ndarray]:
        """(U_test, S) state of each test user after their training events (zeros without any),
        and (U_test,) how many training events that was."""
        h0 = torch.zeros(len(self.test_log.users), self.model.config.state_size, device=self.device)
        seen = np.zeros(len(self.test_log.users), dtype=np.int64)
        if self.train_log is not None and len(self.train_log):
            p = prepare(self.train_log, self.model.config, self.item_vocab, 24 * HOUR_MS,
                        catalogue=self.model.catalogue)
            states = final_states(self.model, self.train_log, p, self.device)
            where = np.searchsorted(self.test_log.users, self.train_log.users)  # both sorted
            h0[torch.from_numpy(where).to(self.device)] = states
            seen[where] = self.train_log.length
        return h0, seen

    @torch.no_grad()
    def rank_next(self, train: Sequences | None, test: Sequences, k_items: int = 20,
                  k_categories: int = 5) -> NextEventPredictions:
        log_, model = self.test_log, self.model
        rows = targets(test)
        query_items = prefix_state(train, test, rows).recent_items
        p = prepare(log_, model.config, self.item_vocab, 24 * HOUR_MS, catalogue=model.catalogue)
        h0, seen = self.initial_states()
        # The state that predicts row (u, t) is the output after test event t-1.
        source_event = log_.start[rows.user] + rows.position - 1
        item_rows, category_rows = rows.item_rows, rows.category_rows
        out_item = np.empty(len(item_rows), dtype=np.int64)
        out_category = np.empty(len(category_rows), dtype=np.int64)
        propensity = np.empty(len(rows), dtype=np.float64)
        for first in range(0, len(log_.users), self.batch_users):
            users = np.arange(first, min(first + self.batch_users, len(log_.users)))
            h, event_idx, _ = run_chunks(model, p, log_.start[users], log_.length[users], self.device,
                                         h0[torch.from_numpy(users).to(self.device)], seen[users])
            at = np.full(len(log_), -1, dtype=np.int64)
            at[event_idx] = np.arange(len(event_idx))
            mine = np.flatnonzero((rows.user >= users[0]) & (rows.user <= users[-1]))
            states = h[torch.from_numpy(at[source_event[mine]]).to(self.device)]
            # The copy bonus's item and category: those of the event the state is after.
            current_item = torch.from_numpy(p.item_vocab[source_event[mine]]).to(self.device)
            # The neighbour sessions' query: the items of the prefix's latest events, as the daemon's state has them.
            recent_item = torch.from_numpy(query_items[mine]).to(self.device)
            recent = torch.from_numpy(recent_categories(p, source_event[mine])).to(self.device)
            category_logits, purchase_logits, _ = model.head_logits(
                states, torch.zeros(len(mine), device=self.device), None, recent)
            propensity[mine] = torch.sigmoid(purchase_logits).cpu().numpy()
            item_mask = np.isin(item_rows, mine)
            sel = np.searchsorted(mine, item_rows[item_mask])
            if len(sel):
                out_item[item_mask] = self._ranks(lambda at: model.item_scores(states[at], current=current_item[at],
                                                                             recent=recent_item[at]),
                                                  sel, rows.item[item_rows[item_mask]], model.config.n_items)
            cat_mask = np.isin(category_rows, mine)
            sel = np.searchsorted(mine, category_rows[cat_mask])
            if len(sel):
                # Category classes are buckets 1..C-1 (bucket 0 means "no category").
                out_category[cat_mask] = self._ranks(lambda at: category_logits[at, 1:], sel,
                                                     rows.category[category_rows[cat_mask]], model.config.category_buckets)
        return NextEventPredictions(out_item, out_category, propensity, rows.purchase_label)

    def _ranks(self, score, sel: np.ndarray, target: np.ndarray, width: int) -> np.ndarray:
        """Ranks of `target` under score(rows) for the rows sel, a bounded number of score cells at a time."""
        step = max(1, CHUNK_ELEMENTS // max(width, 1))
        out = np.empty(len(sel), dtype=np.int64)
        for a in range(0, len(sel), step):
            at = torch.from_numpy(sel[a:a + step]).to(self.device)
            out[a:a + step] = ranks_from_scores(score(at).cpu().numpy(), target[a:a + step])
        return out
