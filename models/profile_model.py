"""The GRU profile model: embed events -> advance each user's hidden state -> heads.

Shape conventions: N events in a batch, U users touched by it, H hidden size,
C category buckets, K interest clusters.

The step is one batched GRU call over every touched user's new events. Events
arrive sorted by (user, event time); `advance` lays them out as a PackedSequence
directly with numpy index arithmetic, so there is no padding to the longest
user and no Python loop over users or events.

Checkpoints are plain data (state dicts, the config that rebuilds the model,
vocabularies, a format version), never a pickled module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from models.features import DENSE_FEATURES, PRICE_EDGES, EventFeatures

CHECKPOINT_FORMAT = 1


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
    # Feed the next-item head's output vector of an event's item back in as an input feature
    # (GRU4Rec's constrained embedding): the GRU reads items in the space it scores them.
    tie_item_embeddings: bool = True
    hash_seed: int = 0  # salts the feature hashing; part of the model, saved with it
    init_seed: int = 0  # weights of a freshly initialised (untrained) model
    churn_horizon_hours: float = 24.0
    # Upper edges of the price tiers on a user's mean item price ("luxury" above the last).
    price_tier_edges: tuple[float, ...] = (20.0, 100.0, 500.0)
    price_tier_names: tuple[str, ...] = ("budget", "mid", "premium", "luxury")

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
        self.drop = nn.Dropout(c.dropout)
        self.category_head = nn.Linear(c.hidden_size, c.category_buckets)
        # Next-item scores over the training vocabulary: one output vector + bias per item.
        self.item_out = nn.Embedding(max(c.n_items, 1), c.hidden_size)
        self.item_bias = nn.Parameter(torch.zeros(max(c.n_items, 1)))
        self.propensity_head = nn.Linear(c.hidden_size, 1)
        self.churn_head = nn.Linear(c.hidden_size, 1)
        # Churn must rise with idle time: its weight on log idle hours is softplus(.) > 0.
        self.churn_idle_weight = nn.Parameter(torch.tensor(1.0))
        # k-means centroids over user states; fitted in training, random until then.
        self.register_buffer("cluster_centroids", torch.randn(c.clusters, c.hidden_size) * 0.1)

    @classmethod
    def fresh(cls, config: ModelConfig) -> "ProfileModel":
        """An untrained model whose weights depend only on config.init_seed (same in every process)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            model = cls(config)
        return model.eval()

    def embed(self, f: EventFeatures) -> torch.Tensor:
        """(N,) events -> (N, input_size)."""
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

    def advance(self, h0: torch.Tensor, x: torch.Tensor, user_of_event: np.ndarray, position: np.ndarray,
                lengths: np.ndarray) -> torch.Tensor:
        """Run the GRU over each user's new events, starting from their stored states.

        h0: (U, H) states before the batch; x: (N, F) embedded events sorted by (user, time);
        user_of_event: (N,) user index 0..U-1; position: (N,) index of the event within its user;
        lengths: (U,) events per user. Returns (U, H) states after each user's last event.
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
        _, h_n = self.gru(packed, h0.unsqueeze(0))  # h_n: (1, U, H), in the callers' user order
        return h_n[0]

    def item_scores(self, h: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """(U, H) states -> (U, n_items) next-item scores, or (U, len(items)) for a candidate subset."""
        h = self.drop(h)
        if items is None:
            return h @ self.item_out.weight.T + self.item_bias
        return h @ self.item_out(items).T + self.item_bias[items]

    def head_logits(self, h: torch.Tensor, idle_hours: torch.Tensor, categories: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(category (U, C), purchase (U,), churn (U,)) logits; training uses these directly.

        categories: score only these buckets, (U, len(categories))."""
        h = self.drop(h)
        weight, bias = self._category_weights(categories)
        return torch.addmm(bias, h, weight.T), *self._purchase_churn_logits(h, idle_hours)

    def _purchase_churn_logits(self, h: torch.Tensor, idle_hours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idle = torch.log1p(idle_hours.clamp(min=0))
        churn = self.churn_head(h)[:, 0] + nn.functional.softplus(self.churn_idle_weight) * idle
        return self.propensity_head(h)[:, 0], churn

    def _category_weights(self, categories: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if categories is None:
            return self.category_head.weight, self.category_head.bias
        return self.category_head.weight[categories], self.category_head.bias[categories]

    def top_categories(self, h: torch.Tensor, categories: torch.Tensor | None, k: int, chunk_users: int = 4096,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely next categories of each user and their probabilities: (U, k) probs, (U, k)
        column indices into `categories` (or bucket ids when None). The softmax over C columns is taken
        chunk by chunk, so the (U, C) matrix never exists whole (66k users x 4k categories = 1 GB)."""
        weight, bias = self._category_weights(categories)
        k = min(k, len(weight))
        probs, cols = [], []
        for start in range(0, len(h), chunk_users):
            logits = torch.addmm(bias, h[start:start + chunk_users], weight.T)  # (u, C)
            top, idx = logits.topk(k, dim=1)
            best = top[:, :1]
            mass = logits.sub_(best).exp_().sum(dim=1, keepdim=True)  # softmax denominator, shifted by the max
            probs.append((top - best).exp_() / mass)
            cols.append(idx)
        if not probs:
            return h.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=h.device)
        return torch.cat(probs), torch.cat(cols)

    def heads(self, h: torch.Tensor, idle_hours: torch.Tensor, categories: torch.Tensor | None = None,
              top_k: int = 3) -> ProfileHeads:
        """h: (U, H) user states; idle_hours: (U,) event time since each user's last event;
        categories: the buckets to distribute over (all when None); top_k: categories kept per user."""
        h = self.drop(h)
        purchase, churn = self._purchase_churn_logits(h, idle_hours)
        top_probs, top_cols = self.top_categories(h, categories, top_k)
        cluster = torch.cdist(h, self.cluster_centroids).argmin(dim=1)  # (U,)
        return ProfileHeads(top_probs, top_cols, torch.sigmoid(purchase), torch.sigmoid(churn), cluster)


@dataclass
class LoadedModel:
    """A model ready to serve, with what the checkpoint said about it."""

    model: ProfileModel
    version: str
    trained: bool
    metadata: dict = field(default_factory=dict)
    item_vocab: list[str] = field(default_factory=list)  # item id of each next-item head row


def untrained(config: ModelConfig | None = None) -> LoadedModel:
    config = config or ModelConfig()
    return LoadedModel(ProfileModel.fresh(config), f"untrained-h{config.hidden_size}-s{config.init_seed}", False)


def save_checkpoint(path: str | Path, model: ProfileModel, version: str, metadata: dict | None = None,
                    item_vocab: list[str] | None = None) -> None:
    """Write a checkpoint of plain data (loadable with torch.load(weights_only=True))."""
    payload = {
        "item_vocab": list(item_vocab or []),
        "format": CHECKPOINT_FORMAT,
        "model_version": version,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        # Through JSON and back: metadata must stay plain data that weights_only loading accepts.
        "metadata": orjson.loads(orjson.dumps(metadata or {}, option=orjson.OPT_SERIALIZE_NUMPY, default=str)),
    }
    torch.save(payload, Path(path))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Read a checkpoint; raise CheckpointError with a message a user can act on."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        raise CheckpointError(f"{str(path)!r} is not a readable profiles checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{str(path)!r} is not a profiles checkpoint (no format version)")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {payload['format']}; this version reads format {CHECKPOINT_FORMAT}"
        )
    try:
        raw = dict(payload["config"])
        config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        model = ProfileModel(config)
        model.load_state_dict(payload["state_dict"])
    except (TypeError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{str(path)!r} does not match this model code: {exc}") from None
    vocab = list(payload.get("item_vocab", []))
    if len(vocab) != config.n_items and config.n_items:
        raise CheckpointError(f"{str(path)!r} has {len(vocab)} vocabulary items for a {config.n_items}-item head")
    model.to(device).eval()
    return LoadedModel(model, str(payload.get("model_version", "unknown")), True,
                       dict(payload.get("metadata", {})), vocab)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def price_tier_index(mean_price: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Tier index per user from the mean price of the items they engaged with; -1 when unknown."""
    tier = np.searchsorted(np.asarray(config.price_tier_edges), mean_price, side="right")
    return np.where(np.isfinite(mean_price), tier, -1)


def idle_hours(now_ms: int | np.ndarray, last_ms: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(now_ms, dtype=np.float64) - last_ms, 0.0) / 3_600_000.0


__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "LoadedModel",
    "ModelConfig",
    "ModelError",
    "ProfileHeads",
    "ProfileModel",
    "idle_hours",
    "load_checkpoint",
    "price_tier_index",
    "resolve_device",
    "save_checkpoint",
    "untrained",
]
