"""Sessions like this one in the training log, and what else they held: the session-kNN score the model weighs.

Session-based k-nearest neighbours (V-SKNN in Ludewig and Jannach's comparison of session-based
recommenders) scores the next item by the training sessions that share items with the user's recent
ones: a session's similarity is the cosine between the user's recent items (the latest weighted 1,
older ones less, linearly) and the session's item set; the K most similar sessions vote for each of
their items with that similarity. It reads whole sessions where the transition bonus
(models/transitions.py) reads one step, and it needs no training. On YOOCHOOSE alone it ranks below the
GRU (Recall@20 0.673 against 0.698) but finds next clicks the GRU misses: together 0.707. The
model adds w * log1p(NEIGHBOUR_SCALE * votes) to each item's score, w chosen after training on the
validation period (sequence_training.fit_neighbour_weight), as the transition weights are.

The index holds the training log's sessions (a user's events split at gaps of over 30 minutes; items of
the next-item vocabulary, each once per session), at most MAX_SESSIONS of them (the latest), and for each
item the latest PER_ITEM sessions holding it (what bounds a query's work). Torch tensors that travel with
the model; a checkpoint holds them beside the state dict.
"""

from __future__ import annotations

import numpy as np
import torch

from models.transitions import ragged_positions

RECENT_ITEMS = 8  # the user's latest events whose items make the query (the state keeps them with --next-items)
NEIGHBOURS = 100  # K: the most similar sessions that vote
MAX_SESSIONS = 50_000  # sessions kept in the index (the latest): a bounded checkpoint
PER_ITEM = 100  # sessions looked up per query item (its latest); 1,000 ranked the same on YOOCHOOSE, REES46 and Taobao
MAX_PAIRS = 4_000_000  # (user, session) candidate pairs scored at once (~100 MB of work arrays); more: in parts
# The score is a sum of cosines; log1p(10 x) makes a tenth of one identical session count as one.
NEIGHBOUR_SCALE = 10.0


def latest_items(items: np.ndarray, at: np.ndarray, first: np.ndarray, width: int = RECENT_ITEMS) -> np.ndarray:
    """(len(at), width) the query at each position at[i] of a flat item array (vocabulary rows, -1: none):
    items[at[i]] and the ones before it back to first[i] (where its user's run starts), latest first, -1 beyond.
    Training and evaluation build it so; the daemon's state keeps it (update_step.shift_in)."""
    back = at[:, None] - np.arange(width)[None, :]
    return np.where(back >= first[:, None], items[np.maximum(back, 0)], -1).astype(np.int64)


def session_items(user: np.ndarray, ts: np.ndarray, item: np.ndarray, gap_ms: float, max_sessions: int,
                  until_ts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Events sorted by (user, time) -> (session, item) of each pair kept, sessions numbered 0.. by their
    last event's time (oldest first): the latest max_sessions of those over by until_ts (all when None),
    each item once per session."""
    none = np.zeros(0, np.int64)
    if len(user) == 0:
        return none, none
    opens = np.ones(len(user), dtype=bool)
    opens[1:] = (user[1:] != user[:-1]) | (ts[1:] - ts[:-1] > gap_ms)
    session = np.cumsum(opens) - 1
    last_ts = np.full(session[-1] + 1, np.iinfo(np.int64).min)
    np.maximum.at(last_ts, session, ts)
    known = item >= 0
    if until_ts is not None:  # a session still going on at until_ts is left out whole
        known &= last_ts[session] <= until_ts
    if not known.any():
        return none, none
    session, item = session[known], item[known].astype(np.int64)
    held = np.unique(session)  # sessions with at least one vocabulary item
    latest = held[np.argsort(last_ts[held], kind="stable")][-max_sessions:]
    renumber = np.full(len(last_ts), -1, dtype=np.int64)
    renumber[latest] = np.arange(len(latest))
    session = renumber[session]
    keep = session >= 0
    width = int(item.max()) + 1
    pairs = np.unique(session[keep] * width + item[keep])
    return pairs // width, pairs % width


class SessionNeighbours:
    """The training sessions' item sets (CSR by session) and each item's sessions (CSR by item, latest first)."""

    def __init__(self, session_indptr: torch.Tensor, session_items: torch.Tensor, item_indptr: torch.Tensor,
                 item_sessions: torch.Tensor) -> None:
        self.session_indptr, self.session_items = session_indptr.long(), session_items.long()
        self.item_indptr, self.item_sessions = item_indptr.long(), item_sessions.long()
        self.session_size = (self.session_indptr[1:] - self.session_indptr[:-1]).float()

    @property
    def n_items(self) -> int:
        return len(self.item_indptr) - 1

    @classmethod
    def empty(cls, n_items: int) -> SessionNeighbours:
        none = torch.zeros(0, dtype=torch.long)
        return cls(torch.zeros(1, dtype=torch.long), none, torch.zeros(n_items + 1, dtype=torch.long), none)

    @classmethod
    def from_events(cls, user: np.ndarray, ts: np.ndarray, item: np.ndarray, n_items: int, gap_ms: float,
                    until_ts: int | None = None, max_sessions: int = MAX_SESSIONS, per_item: int = PER_ITEM
                    ) -> SessionNeighbours:
        """The index of a log's events sorted by (user, time); item: vocabulary rows (-1: none). until_ts: only
        the sessions over by then (validation must not find the session it scores)."""
        session, items = session_items(user, ts, item, gap_ms, max_sessions, until_ts)
        n_sessions = int(session.max()) + 1 if len(session) else 0
        session_indptr = np.concatenate([[0], np.cumsum(np.bincount(session, minlength=n_sessions))])
        # By item, latest session first, at most per_item each.
        order = np.lexsort((-session, items))
        by_item, their_sessions = items[order], session[order]
        rank = np.arange(len(by_item)) - np.searchsorted(by_item, by_item, side="left")
        keep = rank < per_item
        item_indptr = np.concatenate([[0], np.cumsum(np.bincount(by_item[keep], minlength=n_items))])
        return cls(*(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
                     for a in (session_indptr, items, item_indptr, their_sessions[keep])))

    def arrays(self) -> dict[str, torch.Tensor]:
        """Plain tensors for a checkpoint (see `from_arrays`)."""
        return {"session_indptr": self.session_indptr.cpu(), "session_items": self.session_items.cpu(),
                "item_indptr": self.item_indptr.cpu(), "item_sessions": self.item_sessions.cpu()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor]) -> SessionNeighbours:
        return cls(arrays["session_indptr"], arrays["session_items"], arrays["item_indptr"], arrays["item_sessions"])

    def scores(self, recent: torch.Tensor, columns: torch.Tensor | None, width: int,
               neighbours: int = NEIGHBOURS) -> torch.Tensor:
        """(U, width) log1p(NEIGHBOUR_SCALE * the votes of each user's `neighbours` most similar sessions).

        recent: (U, L) vocabulary rows of each user's latest events, latest first (-1: none, or an item
        outside the vocabulary). columns: the sorted items the columns stand for (None: all, in order)."""
        users, device = len(recent), recent.device
        out = torch.zeros(users, width, device=device)
        if len(self.item_sessions) == 0 or recent.numel() == 0:
            return out
        valid = (recent >= 0) & (recent < self.n_items)
        # Linear position weights over the span the query covers: latest 1, the oldest known item 1/m.
        slot = torch.arange(recent.shape[1], device=device)
        span = torch.where(valid, slot + 1, 0).amax(dim=1, keepdim=True)
        weight = (span - slot).clamp(min=0) / span.clamp(min=1)
        # An item seen twice counts once, at its latest (highest) weight.
        same = recent.unsqueeze(2) == recent.unsqueeze(1)  # (U, L, L)
        valid &= ~(torch.tril(same, diagonal=-1) & valid.unsqueeze(1)).any(dim=2)
        u, j = torch.nonzero(valid, as_tuple=True)
        item = recent[u, j]
        # Every (user, session) pair that shares an item, and the query weight it carries.
        starts = self.item_indptr[item]
        lengths = self.item_indptr[item + 1] - starts
        total = int(lengths.sum())
        if total == 0:
            return out
        if total > MAX_PAIRS and users > 1:  # bounded memory: halves of the users, by their pairs
            pairs_before = torch.zeros(users, dtype=torch.long, device=device).index_add_(0, u, lengths).cumsum(0)
            half = int(torch.searchsorted(pairs_before, pairs_before[-1] // 2).clamp(1, users - 1))
            return torch.cat([self.scores(recent[:half], columns, width, neighbours),
                              self.scores(recent[half:], columns, width, neighbours)])
        pair, at = ragged_positions(starts, lengths)
        session = self.item_sessions[at]
        n_sessions = len(self.session_size)
        key, inverse = torch.unique(u[pair] * n_sessions + session, return_inverse=True)
        dot = torch.zeros(len(key), device=device).index_add_(0, inverse, weight[u, j][pair].float())
        key_user, key_session = key // n_sessions, key % n_sessions
        query_size = valid.sum(dim=1).float()
        similarity = dot / torch.sqrt(query_size[key_user] * self.session_size[key_session])
        # The `neighbours` most similar sessions of each user: one sort by user, then similarity descending
        # (similarity is in (0, 1]: user + (1 - similarity) / 2 orders both; ties stay in session order).
        order = torch.sort(key_user.double() + (1 - similarity.double()) / 2, stable=True).indices
        key_user, key_session, similarity = key_user[order], key_session[order], similarity[order]
        first = torch.searchsorted(key_user, key_user, right=False)
        keep = torch.arange(len(key_user), device=device) - first < neighbours
        key_user, key_session, similarity = key_user[keep], key_session[keep], similarity[keep]
        # Each kept session votes for its items with its similarity.
        starts = self.session_indptr[key_session]
        vote, at = ragged_positions(starts, self.session_indptr[key_session + 1] - starts)
        voted = self.session_items[at]
        rows, value = key_user[vote], similarity[vote]
        if columns is not None:
            col = torch.searchsorted(columns, voted).clamp(max=len(columns) - 1)
            hit = columns[col] == voted
            rows, voted, value = rows[hit], col[hit], value[hit]
        out.index_put_((rows, voted), value, accumulate=True)
        return torch.log1p(NEIGHBOUR_SCALE * out)
