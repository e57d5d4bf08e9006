"""The GRU profile model: embed events -> advance each user's state (GRU hidden state + memory) -> heads.

Shape conventions: N events in a batch, U users touched by it, H hidden size, M memory size,
S = H + M state size, C category buckets, K interest clusters.

A user's state is two parts: the GRU's hidden state h (the sequence: what the user is doing now)
and a long-term memory m, M moving averages of a projection of h over the user's events, with
fixed time scales from a few to hundreds of events (what the user keeps coming back to; as in
LSTUR's long- and short-term user representations). Each average is a plain mean over the user's
first tau events and an exponential one after, so a young user's memory is as large as an old
one's. The heads read both; the next-item head reads h. Next-event targets alone taught a GRU the
current session and little of a user's lasting interests (top_categories precision@3 0.40 against
0.84 for counting on generated traffic).

The step is one batched GRU call over every touched user's new events. Events
arrive sorted by (user, event time); `advance` lays them out as a PackedSequence
directly with numpy index arithmetic, so there is no padding to the longest
user and no Python loop over users or events.

The published fields' heads are in models/field_heads.py, checkpoints on disk in
models/checkpoint_io.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from models.features import DENSE_FEATURES, PRICE_EDGES, EventFeatures
from stream.profiles import CHURN_HORIZON_HOURS, PURCHASE_HORIZON_HOURS, TOP_CATEGORIES
from models.field_heads import FieldHeads, FieldInputs, HazardHead, idle_minutes
from models.catalogue import ItemCatalogue
from models.neighbours import SessionNeighbours
from models.transitions import Transitions



# Users scored against every category at once (category_logits: a (users, categories) matrix) at most so many scores
# at a time: 4,096 users of 4,096 categories, 64 MB of float32. A shop with 100,000 category names scored 4,096 users
# at once in 1.6 GB matrices, several alive together (5.6 GB on 20,000 users); a producer writing product titles as
# categories would have run the daemon out of memory.
CATEGORY_SCORES_AT_ONCE = 4096 * 4096


def users_at_once(categories: int, most: int = 4096) -> int:
    """How many users to score against `categories` categories at a time (CATEGORY_SCORES_AT_ONCE)."""
    return max(1, min(most, CATEGORY_SCORES_AT_ONCE // max(categories, 1)))


RECENT_CATEGORIES = 2  # the categories the next-event copy bonus reads: the current one, the distinct one before


def forget_items(f: EventFeatures, share: float) -> EventFeatures:
    """The events with a random `share` of their items read as unknown (no item bucket, no vocabulary row), as
    serving reads an item outside the model's catalogue (models/features.item_inputs)."""
    forget = torch.rand(f.item.shape, device=f.item.device) < share
    return replace(f, item=f.item.masked_fill(forget, 0), item_vocab=f.item_vocab.masked_fill(forget, -1))


class ModelError(Exception):
    """Root of the model package's errors."""


class CheckpointError(ModelError):
    """A checkpoint that cannot be read or does not match this code."""


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 64
    type_dim: int = 8
    item_buckets: int = 1 << 17
    item_dim: int = 32
    category_buckets: int = 1 << 14
    category_dim: int = 16
    query_buckets: int = 1 << 15
    query_dim: int = 16
    price_dim: int = 4
    clusters: int = 8
    n_items: int = 0  # item vocabulary of the next-item head (0: no head, as in an untrained model)
    dropout: float = 0.0  # on embeddings and states, in training only
    # Share of training events whose item the model reads as unknown (models/catalogue.py), in training only:
    # served where ids mean other products, or none it knows, it has learned what an event says without one.
    unknown_items: float = 0.0
    memory_size: int = 16  # long-term memory dimensions (0: the state is the GRU's hidden state alone)
    memory_timescales: tuple[float, ...] = (4.0, 256.0)  # events; the M decays are log-spaced between
    # Feed the next-item head's output vector of an event's item back in as an input feature
    # (GRU4Rec's constrained embedding): the GRU reads items in the space it scores them.
    tie_item_embeddings: bool = True
    hash_seed: int = 0  # salts the feature hashing; part of the model, saved with it
    init_seed: int = 0  # weights of a freshly initialised (untrained) model
    # The horizons of the published probabilities (the profile contract's, stream/profiles.py).
    purchase_horizon_hours: float = PURCHASE_HORIZON_HOURS
    churn_horizon_hours: float = CHURN_HORIZON_HOURS
    field_hidden: int = 16  # width of the field heads' small MLP over the user statistics
    # top_categories are published as the categories of the user's next visit: the category head
    # read at an idle time of at least this many hours (the current session's intent fades out).
    visit_break_hours: float = 24.0
    # Upper edges of the price tiers on a user's mean item price ("luxury" above the last).
    price_tier_edges: tuple[float, ...] = (20.0, 100.0, 500.0)
    price_tier_names: tuple[str, ...] = ("budget", "mid", "premium", "luxury")

    @property
    def state_size(self) -> int:
        """Floats per user in the state table: GRU hidden state, then long-term memory."""
        return self.hidden_size + self.memory_size

    @property
    def input_size(self) -> int:
        tied = self.hidden_size if self.tie_item_embeddings else 0
        return self.type_dim + self.item_dim + self.category_dim + self.query_dim + self.price_dim + DENSE_FEATURES + tied


@dataclass
class ProfileHeads:
    """Head outputs for U users (tensors on the model's device)."""

    top_category_probs: torch.Tensor  # (U, k) the k most likely next categories' probabilities, best first
    top_category_cols: torch.Tensor  # (U, k) their columns (indices into the categories asked for, or buckets)
    purchase_propensity: torch.Tensor  # (U,) P(purchase within the horizon)
    churn_risk: torch.Tensor  # (U,) P(no activity within the horizon)
    interest_cluster: torch.Tensor  # (U,) long, nearest centroid


class ProfileModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.type_emb = nn.Embedding(4, c.type_dim)
        self.item_emb = nn.Embedding(c.item_buckets, c.item_dim)
        self.category_emb = nn.Embedding(c.category_buckets, c.category_dim)
        self.query_emb = nn.EmbeddingBag(c.query_buckets, c.query_dim, mode="mean")
        self.price_emb = nn.Embedding(len(PRICE_EDGES) + 2, c.price_dim)
        self.gru = nn.GRU(c.input_size, c.hidden_size, batch_first=False)
        self.memory_in = nn.Linear(c.hidden_size, c.memory_size)
        # Per-dimension decay per event: memory j fades with a time scale of tau_j events.
        tau = np.geomspace(*c.memory_timescales, num=c.memory_size) if c.memory_size else np.zeros(0)
        self.register_buffer("memory_decay", torch.from_numpy(np.exp(-1.0 / np.maximum(tau, 1e-6))).float())
        self.drop = nn.Dropout(c.dropout)
        # Next category = the next event's (mostly the current session's) + gate(idle) x a correction
        # for "after a break" (the next visit's). Only the user's returns after a break teach the
        # visit head, which is what makes it learn lasting favourites instead of session intent.
        self.category_head = nn.Linear(c.state_size, c.category_buckets)
        self.visit_category_head = nn.Linear(c.state_size, c.category_buckets)
        nn.init.zeros_(self.visit_category_head.weight)  # untrained: no correction, idle changes nothing
        nn.init.zeros_(self.visit_category_head.bias)
        # gate = sigmoid(softplus(w) * log1p(idle hours) + b): rises with idle time by construction;
        # starts near 0 within a session (seconds) and near 1 after half an hour.
        self.visit_gate = nn.Parameter(torch.tensor([2.0, -3.0]))
        # Copy the current event: the next event mostly repeats the item or category just seen, which
        # an output layer over thousands of classes learns from few examples per class (REES46: "next
        # category = this one" 0.910 accuracy@5 against 0.685 without this). A bonus, read from the
        # state, on the current event's column; the category's fades with idle time as the visit
        # correction takes over. Zero-initialised: no copying until trained to.
        self.item_copy = nn.Linear(c.hidden_size, 1)
        self.category_copy = nn.Linear(c.state_size, RECENT_CATEGORIES)  # one bonus per recent category
        for layer in (self.item_copy, self.category_copy):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # What followed the current item / category in the training log (models/transitions.py): their
        # weights in the next item's and the next category's scores, fitted after training on the
        # validation period (sequence_training.fit_transition_weights), not learned with the GRU.
        self.register_buffer("transition_weight", torch.zeros(2))  # (item, category)
        self.set_transitions(None, None)
        # The training log's items and their categories: items outside it are read as unknown (None: every item
        # is known, as in checkpoints before format 19).
        self.catalogue: ItemCatalogue | None = None
        # The training log's sessions like the user's latest events (models/neighbours.py): their votes'
        # weight in the next item's scores, fitted after training on the validation period as well.
        self.register_buffer("neighbour_weight", torch.zeros(1))
        self.set_neighbours(None)
        # Next-item scores over the training vocabulary: one output vector + bias per item.
        self.item_out = nn.Embedding(max(c.n_items, 1), c.hidden_size)
        self.item_bias = nn.Parameter(torch.zeros(max(c.n_items, 1)))
        # Auxiliary purchase and churn heads: training objectives that shape the state. The published
        # fields come from `fields`, which reads the state beside the user's exact statistics.
        self.propensity_head = nn.Linear(c.state_size, 1)
        self.churn_head = nn.Linear(c.state_size, 1)
        # Churn must rise with idle time: its weight on log idle hours is softplus(.) > 0.
        self.churn_idle_weight = nn.Parameter(torch.tensor(1.0))
        self.fields = FieldHeads(c.state_size, c.field_hidden)
        # k-means centroids over user states; fitted in training, random until then.
        self.register_buffer("cluster_centroids", torch.randn(c.clusters, c.state_size) * 0.1)

    @classmethod
    def fresh(cls, config: ModelConfig) -> "ProfileModel":
        """An untrained model whose weights depend only on config.init_seed (same in every process)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            model = cls(config)
        return model.eval()

    def embed(self, f: EventFeatures) -> torch.Tensor:
        """(N,) events -> (N, input_size)."""
        if self.training and self.config.unknown_items > 0:
            f = forget_items(f, self.config.unknown_items)
        tied = []
        if self.config.tie_item_embeddings:
            known = (f.item_vocab >= 0).unsqueeze(1)  # items outside the vocabulary contribute zeros
            tied = [self.item_out(f.item_vocab.clamp(min=0)) * known]
        return self.drop(torch.cat(
            [
                self.type_emb(f.type_idx),
                self.item_emb(f.item),
                self.category_emb(f.category),
                self.query_emb(f.query_tokens, f.query_offsets),
                self.price_emb(f.price_bucket),
                f.dense,
                *tied,
            ],
            dim=1,
        ))

    def advance(self, s0: torch.Tensor, x: torch.Tensor, user_of_event: np.ndarray, position: np.ndarray,
                lengths: np.ndarray, events_before: np.ndarray) -> torch.Tensor:
        """Run the GRU and the memory over each user's new events, starting from their stored states.

        s0: (U, S) states before the batch; x: (N, F) embedded events sorted by (user, time);
        user_of_event: (N,) user index 0..U-1; position: (N,) index of the event within its user;
        lengths: (U,) events per user; events_before: (U,) events each user had before (their
        memory's age). Returns (U, S) states after each user's last event.
        """
        # PackedSequence layout: time step t holds the users with more than t events,
        # longest first. Event (u, t) goes to row batch_start[t] + rank[u].
        order = np.argsort(-lengths, kind="stable")  # users, longest first
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        batch_sizes = np.bincount(position, minlength=int(lengths.max()))  # users alive at each step
        batch_start = np.zeros_like(batch_sizes)
        np.cumsum(batch_sizes[:-1], out=batch_start[1:])
        slot = torch.from_numpy(batch_start[position] + rank[user_of_event]).to(x.device)
        data = torch.empty_like(x)
        data[slot] = x
        sorted_indices = torch.from_numpy(order).to(x.device)
        packed = PackedSequence(
            data,
            torch.from_numpy(batch_sizes.astype(np.int64)),  # must stay on the CPU
            sorted_indices,
            torch.from_numpy(rank).to(x.device),
        )
        return self.run_packed(packed, s0, events_before, every_step=False)[1]

    def run_packed(self, packed: PackedSequence, s0: torch.Tensor, events_before: np.ndarray, every_step: bool
                   ) -> tuple[PackedSequence | None, torch.Tensor]:
        """The GRU and the memory over a PackedSequence of embedded events (with sorted_indices), from
        states s0 (U, S) and event counts events_before (U,), both in the callers' user order.
        Returns (the state after every event, packed like the input, when every_step; (U, S) final
        states in the callers' order). The one place a state advances: serving and training share it."""
        h0, m0 = self.split_state(s0)
        out, h_n = self.gru(packed, h0.unsqueeze(0).contiguous())  # h_n: (1, U, H), in the callers' user order
        steps, final = (out if every_step else None), h_n[0]
        if self.config.memory_size:
            order = packed.sorted_indices
            memory, m_n = self.memory_scan(out.data, packed.batch_sizes.numpy(), m0[order],
                                           np.asarray(events_before)[order.cpu().numpy()], every_step)
            final = torch.cat([final, m_n[packed.unsorted_indices]], dim=1)
            if every_step:
                steps = out._replace(data=torch.cat([out.data, memory], dim=1))
        return steps, final

    def split_state(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, S) states -> (U, H) GRU hidden states, (U, M) memories."""
        return s[:, :self.config.hidden_size], s[:, self.config.hidden_size:]

    def memory_scan(self, h_packed: torch.Tensor, batch_sizes: np.ndarray, m0_sorted: torch.Tensor,
                    events_before_sorted: np.ndarray, every_step: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The memory recurrence m_n = m_(n-1) + max(1 - d, 1 / n) * (tanh(W h_n) - m_(n-1)), n = the
        user's event count, over packed GRU outputs: a mean of the first 1 / (1 - d) events, then
        an exponential moving average.

        h_packed: (N, H) in PackedSequence layout (time-major, longest user first); batch_sizes: users
        alive at each step; m0_sorted: (U, M) memories and events_before_sorted: (U,) event counts,
        in that user order. Returns (the memory after every event, in the same packed layout, when
        every_step; (U, M) final memories, same order).
        One vectorised step per time step of the longest user: a Python loop as long as the GRU's own.
        """
        z = torch.tanh(self.memory_in(h_packed))  # (N, M)
        rate = 1 - self.memory_decay  # (M,)
        count = torch.from_numpy(np.asarray(events_before_sorted, dtype=np.float32)).to(z.device).unsqueeze(1)
        m, start, steps = m0_sorted, 0, []
        finals = []
        for alive in batch_sizes.tolist():
            if alive < len(m):  # users that ended at the previous step keep their memory
                finals.append(m[alive:])
                m, count = m[:alive], count[:alive]
            count = count + 1
            m = m + torch.maximum(rate, 1 / count) * (z[start:start + alive] - m)
            start += alive
            if every_step:
                steps.append(m)
        finals.append(m)
        final = torch.cat(finals[::-1])  # dropped in order of decreasing rank: reverse restores rank order
        return (torch.cat(steps) if every_step else None), final

    def set_transitions(self, items: Transitions | None, categories: Transitions | None) -> None:
        """The training log's successor counts of items (vocabulary rows) and category buckets; None: none.
        Kept as buffers so that they move with the model, outside the state dict (their size is the log's)."""
        device = self.type_emb.weight.device
        for name, table, n in (("item", items, max(self.config.n_items, 1)),
                               ("category", categories, self.config.category_buckets)):
            for part, tensor in (table or Transitions.empty(n)).arrays().items():
                self.register_buffer(f"{name}_transitions_{part}", tensor.to(device), persistent=False)

    def set_neighbours(self, table: SessionNeighbours | None) -> None:
        """The training log's session index over the item vocabulary (None: none); buffers, as set_transitions'."""
        device = self.type_emb.weight.device
        for part, tensor in (table or SessionNeighbours.empty(max(self.config.n_items, 1))).arrays().items():
            self.register_buffer(f"neighbours_{part}", tensor.to(device), persistent=False)

    def neighbours(self) -> SessionNeighbours:
        """The training log's session index (empty where the votes count for nothing)."""
        return SessionNeighbours(*(getattr(self, f"neighbours_{part}") for part in
                                   ("session_indptr", "session_items", "item_indptr", "item_sessions")))

    def transitions(self, name: str) -> Transitions:
        """The "item" or "category" successor counts."""
        return Transitions(*(getattr(self, f"{name}_transitions_{part}") for part in ("indptr", "cols", "counts")))

    def item_scores(self, s: torch.Tensor, items: torch.Tensor | None = None, current: torch.Tensor | None = None,
                    recent: torch.Tensor | None = None) -> torch.Tensor:
        """The next-item scores of `item_scores_and_bonus`, with the bonuses added (serving, evaluation)."""
        scores, bonus = self.item_scores_and_bonus(s, items, current, recent)
        return scores if bonus is None else scores + bonus

    def item_scores_and_bonus(self, s: torch.Tensor, items: torch.Tensor | None = None,
                              current: torch.Tensor | None = None, recent: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(U, S) states -> (U, n_items) next-item scores, or (U, len(items)) for a candidate subset.
        Items are scored from the GRU's hidden state: the space the item vectors are fed back in.
        current: (U,) vocabulary index of each user's current item (-1: none), which gets the copy bonus,
        and whose successors the transition bonus (None: neither). recent: (U, L) the items of the user's
        latest events, latest first (-1: none), whose neighbour sessions vote (None: no votes). Apart,
        because training scores both the sum and the scores alone."""
        h = self.drop(self.split_state(s)[0])
        if items is None:
            scores = h @ self.item_out.weight.T + self.item_bias
        else:
            scores = h @ self.item_out(items).T + self.item_bias[items]
        if current is None:
            return scores, None
        width = scores.shape[1]
        bonus = copy_bonus(self.item_copy(h)[:, 0], current, items, width)
        if self.transition_weight[0] != 0:
            bonus = bonus + self.transition_weight[0] * self.item_follows(current, items, width)
        if recent is not None and self.neighbour_weight[0] != 0:
            bonus = bonus + self.neighbour_weight[0] * self.neighbours().scores(recent, items, width)
        return scores, bonus

    def item_follows(self, current: torch.Tensor, items: torch.Tensor | None, width: int) -> torch.Tensor:
        """(U, width) the transition bonus of the next items at weight 1: log(1 + times each followed the
        user's current item (U,), -1: none) in the training log. items: the columns' items (None: all)."""
        return self.transitions("item").scores(torch.ones((), device=current.device), current, items, width)

    def category_follows(self, idle_hours: torch.Tensor, recent: torch.Tensor, categories: torch.Tensor | None,
                         width: int) -> torch.Tensor:
        """(U, width) the transition bonus of the next categories at weight 1, fading after a break as the
        copy bonus does. recent: as category_logits'."""
        fade = 1 - self.visit_gate_at(idle_hours)
        return self.transitions("category").scores(fade, torch.where(recent[:, 0] > 0, recent[:, 0], -1), categories,
                                                   width)

    def head_logits(self, s: torch.Tensor, idle_hours: torch.Tensor, categories: torch.Tensor | None = None,
                    recent_categories: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(category (U, C), purchase (U,), churn (U,)) logits; training uses these directly.

        categories: score only these buckets, (U, len(categories)); recent_categories: see category_logits."""
        s = self.drop(s)
        return (self.category_logits(s, idle_hours, categories, recent_categories),
                *self._purchase_churn_logits(s, idle_hours))

    def category_logits(self, s: torch.Tensor, idle_hours: torch.Tensor, categories: torch.Tensor | None = None,
                        recent: torch.Tensor | None = None) -> torch.Tensor:
        """(U, C) next-category logits of users idle for idle_hours (U,). recent: (U, RECENT_CATEGORIES)
        buckets of each user's current category and the distinct one before it (0: none), which get
        the copy bonuses, and the current one's successors the transition bonus; None (the published
        fields' explore side, whose repeat side counts the user's own categories): neither."""
        weight, bias = self._category_weights(categories, self.category_head)
        visit_weight, visit_bias = self._category_weights(categories, self.visit_category_head)
        gate = self.visit_gate_at(idle_hours).unsqueeze(1)  # (U, 1)
        logits = torch.addmm(bias, s, weight.T) + gate * torch.addmm(visit_bias, s, visit_weight.T)
        if recent is None:
            return logits
        bonus = (1 - gate) * self.category_copy(s)  # (U, R)
        known = torch.where(recent > 0, recent, -1)
        for r in range(recent.shape[1]):
            logits = logits + copy_bonus(bonus[:, r], known[:, r], categories, logits.shape[1])
        if self.transition_weight[1] != 0:
            logits = logits + self.transition_weight[1] * self.category_follows(idle_hours, recent, categories,
                                                                                 logits.shape[1])
        return logits

    def visit_gate_at(self, idle_hours: torch.Tensor) -> torch.Tensor:
        """(U,) weight of the after-a-break correction at these idle times."""
        slope, offset = nn.functional.softplus(self.visit_gate[0]), self.visit_gate[1]
        return torch.sigmoid(slope * torch.log1p(idle_hours.clamp(min=0)) + offset)

    def _purchase_churn_logits(self, s: torch.Tensor, idle_hours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idle = torch.log1p(idle_hours.clamp(min=0))
        churn = self.churn_head(s)[:, 0] + nn.functional.softplus(self.churn_idle_weight) * idle
        return self.propensity_head(s)[:, 0], churn

    @staticmethod
    def _category_weights(categories: torch.Tensor | None, head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        if categories is None:
            return head.weight, head.bias
        return head.weight[categories], head.bias[categories]

    def field_probabilities(self, s: torch.Tensor, inputs: FieldInputs, purchase_hours: torch.Tensor | float,
                            churn_hours: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(purchase_propensity, churn_risk) (U,) over these horizons (hours) from the profile's clock."""
        x = self.fields.standardise(inputs.user)
        purchase_hours = torch.as_tensor(purchase_hours, dtype=x.dtype, device=x.device).expand(len(x))
        churn_hours = torch.as_tensor(churn_hours, dtype=x.dtype, device=x.device).expand(len(x))
        idle = idle_minutes(inputs.user)
        purchase = HazardHead.probability(self.fields.purchase.log_hazard(x, s, purchase_hours, inputs.idle_steps,
                                                                          idle))
        churn = 1 - HazardHead.probability(self.fields.event.log_hazard(x, s, churn_hours, inputs.idle_steps, idle))
        return purchase, churn

    def category_mixture(self, s: torch.Tensor, idle_hours: torch.Tensor, categories: torch.Tensor | None,
                         inputs: FieldInputs, k: int, slot_weights: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely categories under repeat/explore: P(c) = g * repeat(c) + (1 - g) * explore(c).
        Returns (U, k) probabilities and (U, k) columns, best first. Repeat mass sits on the user's slots
        only, so the best k lie among the slots and explore's own best k: nothing else is ranked.
        slot_weights: (len(SLOT_FEATURES) + 1,) where the shop's own outcomes re-rank the candidates
        (models/category_calibration.py): each candidate's P(c) to the power 1 + the last weight, the slots' times
        exp(the others . their statistics), renormalised so the candidates keep their mass."""
        width = self.config.category_buckets if categories is None else len(categories)
        k = min(k, width)
        if k == 0:  # no category seen yet
            return s.new_zeros(len(s), 0), torch.zeros(len(s), 0, dtype=torch.long, device=s.device)
        p, c = self.category_candidates(s, idle_hours, categories, inputs, k)
        if slot_weights is not None:
            p = reranked(p, inputs.slot, slot_weights)
        p, j = p.topk(k, dim=1)
        return p, c.gather(1, j)

    def category_candidates(self, s: torch.Tensor, idle_hours: torch.Tensor, categories: torch.Tensor | None,
                            inputs: FieldInputs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What category_mixture ranks: (U, K + k) P(c) of the user's K slots then explore's best k (-1 where a slot
        is empty or an explore column is also a slot, counted there), and their (U, K + k) columns. Users are scored
        against every category (a (U, C) matrix) users_at_once(C) at a time."""
        width = self.config.category_buckets if categories is None else len(categories)
        k = min(k, width)
        step = users_at_once(width)
        if len(s) > step:
            parts = [self.category_candidates(s[a:a + step], idle_hours[a:a + step], categories,
                                              inputs.part(a, a + step), k) for a in range(0, len(s), step)]
            return torch.cat([p for p, _ in parts]), torch.cat([c for _, c in parts])
        x = self.fields.standardise(inputs.user)
        logits = self.category_logits(s, idle_hours, categories)  # (U, C)
        explore = torch.log_softmax(logits, dim=1)
        slot_cols = inputs.slot_cols.clamp(0, width - 1)
        explore_slots = explore.gather(1, slot_cols)
        repeat = self.fields.repeat_log_probs(inputs, explore_slots).exp()  # (U, K), 0 at empty slots
        g = self.fields.repeat_gate(x, s, inputs, explore_slots, width)[:, None]
        explore_top, explore_cols = explore.exp_().topk(k, dim=1)
        at_slots = (g * repeat + (1 - g) * explore_slots.exp()).masked_fill(~inputs.slot_valid, -1.0)
        # Explore's best columns that are also slots are already counted there.
        dup = (explore_cols[:, :, None] == slot_cols[:, None, :]) & inputs.slot_valid[:, None, :]
        at_explore = ((1 - g) * explore_top).masked_fill(dup.any(dim=2), -1.0)
        return torch.cat([at_slots, at_explore], dim=1), torch.cat([slot_cols, explore_cols], dim=1)

    def next_visit_idle(self, idle_hours: torch.Tensor) -> torch.Tensor:
        """The idle time published categories are read at: the next visit's, so a user mid-session is read as if
        back after a break."""
        return idle_hours.clamp(min=self.config.visit_break_hours)

    def heads(self, s: torch.Tensor, idle_hours: torch.Tensor, categories: torch.Tensor | None = None,
              top_k: int = TOP_CATEGORIES, inputs: FieldInputs | None = None,
              horizons_hours: tuple[float, float] | None = None,
              slot_weights: torch.Tensor | None = None) -> ProfileHeads:
        """s: (U, S) user states; idle_hours: (U,) event time since each user's last event;
        categories: the buckets to distribute over (all when None); top_k: categories kept per user;
        inputs: the users' statistics (only the idle time when None); horizons_hours: (purchase, churn)
        horizons, the contract's by default (the evaluation asks for a shorter one where a log ends sooner);
        slot_weights: the shop's re-ranking of top_categories (category_mixture)."""
        inputs = inputs if inputs is not None else FieldInputs.from_idle(idle_hours)
        purchase_h, churn_h = horizons_hours or (self.config.purchase_horizon_hours, self.config.churn_horizon_hours)
        purchase, churn = self.field_probabilities(s, inputs, purchase_h, churn_h)
        top_probs, top_cols = self.category_mixture(s, self.next_visit_idle(idle_hours), categories, inputs, top_k,
                                                    slot_weights)
        cluster = torch.cdist(s, self.cluster_centroids).argmin(dim=1)  # (U,)
        return ProfileHeads(top_probs, top_cols, purchase, churn, cluster)


def reranked(p: torch.Tensor, slot: torch.Tensor, slot_weights: torch.Tensor) -> torch.Tensor:
    """Candidates' P(c) ((U, K + k), -1 where none) re-weighed by P(c) ** slot_weights[-1] (every candidate's) and
    exp(slot_weights[:-1] . each slot's statistics (U, K, F)) (explore's candidates hold no slot: 1), renormalised to
    the candidates' mass."""
    held = p >= 0
    log_boost = slot_weights[-1] * torch.log(p.to(slot_weights.dtype).clamp(min=1e-30))
    log_boost[:, :slot.shape[1]] += slot.to(slot_weights.dtype) @ slot_weights[:-1]
    weighed = torch.where(held, p * torch.exp(log_boost).to(p.dtype), p.new_zeros(()))
    mass = torch.where(held, p, p.new_zeros(())).sum(dim=1, keepdim=True)
    out = weighed * (mass / weighed.sum(dim=1, keepdim=True).clamp(min=1e-30))
    return torch.where(held, out, p)


def copy_bonus(bonus: torch.Tensor, current: torch.Tensor, columns: torch.Tensor | None, width: int) -> torch.Tensor:
    """(U, width) scores that are bonus (U,) at each user's current class (U,) (-1: none), 0 elsewhere.
    columns: the classes the scores' columns stand for (all classes, in order, when None)."""
    if columns is None:
        at = torch.zeros(len(bonus), width, dtype=bonus.dtype, device=bonus.device)
        known = current >= 0
        return at.scatter(1, current.clamp(min=0).unsqueeze(1), (bonus * known).unsqueeze(1))
    return (columns.unsqueeze(0) == current.unsqueeze(1)) * bonus.unsqueeze(1)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA device is available")
    return full_float32(torch.device(name))


def full_float32(device: torch.device) -> torch.device:
    """On CUDA, keep float32 arithmetic float32: cuDNN's GRU otherwise multiplies in TF32 (10-bit mantissa),
    and a user's state would then depend on how its events were batched (seen on an H200: 1e-4 apart between
    batchings) and differ from a CPU replay's. The model is small: TF32 made the step no faster
    (docs/benchmarks.md, the GPU runs)."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def price_tier_index(mean_price: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Tier index per user from the mean price of the items they engaged with; -1 when unknown."""
    tier = np.searchsorted(np.asarray(config.price_tier_edges), mean_price, side="right")
    return np.where(np.isfinite(mean_price), tier, -1)


def idle_hours(now_ms: int | np.ndarray, last_ms: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(now_ms, dtype=np.float64) - last_ms, 0.0) / 3_600_000.0
