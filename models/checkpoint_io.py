"""Model checkpoints on disk: plain data (state dicts, the config that rebuilds the model, vocabularies,
a format version), never a pickled module; and the model shipped in the package (`--model demo`)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
import torch

from models.field_heads import (
    CALIBRATION_KNOTS, HABIT_COUNT, HABIT_COUNTS_WEIGHT, HABIT_FRESHNESS, HABIT_RECENCY_WEIGHT, SESSION_OFF,
    SILENCE_MINUTES, identity_knots,
)
from models.profile_model import RECENT_CATEGORIES, CheckpointError, ModelConfig, ProfileModel
from models.catalogue import ItemCatalogue
from models.neighbours import SessionNeighbours
from models.transitions import Transitions
from stream.statistics import HEAD_FEATURES, SLOT_FEATURES

# 2: long-term memory in the state; category head conditioned on idle time.
# 3: published fields from FieldHeads (exact statistics + state; time-to-event probabilities, calibrated).
# 4: calibration a monotone piecewise-linear map of log L (format 3's affine one is read as two knots).
# 5: copy bonuses of the current item and category (formats 3 and 4 are read without copying).
CHECKPOINT_FORMAT = 20  # 6: the follow-up slot features (stream/follow.py); 7: the visit slot features;
# 8: the shop popularity slot feature (stream/popularity.py); 9: transition bonuses (models/transitions.py);
# 10: times since as log1p of minutes, not hours (stream/statistics.py: USER_FEATURES), and the probability
# heads' session process (models/field_heads.py: HazardHead); 11: the neighbour sessions' votes (models/neighbours.py);
# 12: follow_pending is the follow-up's share itself, not relative to the top one's (stream/follow.py);
# 13: the session processes decay with idle time in the shop's pace (HazardHead.idle_decay, stream/tempo.py);
# 14: as a power of it, not exponentially (HazardHead.power_fade); 15: the return processes fall after a long
# silence (HazardHead.silence_power); 16: the freshness slot feature (stream/statistics.py: _freshness); 17: the
# purchase rhythm's user features (stream/statistics.py: USER_FEATURES from log_orders on); 18: the habit_freshness
# slot feature, weighed HABIT_RECENCY_WEIGHT in every model (stream/habit.py); 19: the training log's item catalogue
# (models/catalogue.py; older checkpoints know every item) and ModelConfig.unknown_items; 20: the habit_count slot
# feature, weighed HABIT_COUNTS_WEIGHT in every model, and the training shop's lean toward the counts
READABLE_FORMATS = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20)
# The heads' weights that read the user features, one column per feature (models/field_heads.py).
_USER_FEATURE_WEIGHTS = tuple(f"fields.{head}.{layer}.weight" for head in ("purchase", "event")
                              for layer in ("linear", "mlp.0", "shape", "session")) + ("fields.gate.weight",)


@dataclass
class LoadedModel:
    """A model ready to serve, with what the checkpoint said about it."""

    model: ProfileModel
    version: str
    trained: bool
    metadata: dict = field(default_factory=dict)
    item_vocab: list[str] = field(default_factory=list)  # item id of each next-item head row
    format: int = CHECKPOINT_FORMAT  # the file's checkpoint format (older ones are read with defaults)

    @property
    def state_version(self) -> str:
        """The version of the model whose state this one keeps (changelog, snapshots): its own, or for a model
        calibrated again for another shop (`profiles calibrate`), the one it was calibrated from, whose
        state is the same."""
        return str(self.metadata.get("state_version") or self.version)


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
        "transitions": {name: model.transitions(name).arrays() for name in ("item", "category")},
        "neighbours": model.neighbours().arrays(),
        **({"catalogue": model.catalogue.arrays()} if model.catalogue is not None else {}),
        # Through JSON and back: metadata must stay plain data that weights_only loading accepts.
        "metadata": orjson.loads(orjson.dumps(metadata or {}, option=orjson.OPT_SERIALIZE_NUMPY, default=str)),
    }
    torch.save(payload, Path(path))


# The model shipped in the package: trained on the generator's structured shop (`--model demo`), so the
# demo, the deploy stack and a first try publish learned fields that mean something. Rebuilt with the
# command in docs/model.md; a file of an older format is read with the defaults above.
DEMO_MODEL = "demo"
DEMO_MODEL_PATH = Path(__file__).parent / "checkpoints" / "demo.pt"


def checkpoint_path(path: str | Path) -> Path:
    """The file a --model value names ("demo": the shipped model)."""
    return DEMO_MODEL_PATH if str(path) == DEMO_MODEL else Path(path)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Read a checkpoint ("demo": the shipped one); raise CheckpointError with a message a user can act on."""
    path = checkpoint_path(path)
    if path.is_dir():
        raise CheckpointError(f"model checkpoint {str(path)!r} is a directory: give the .pt file "
                              "`profiles train --out` wrote")
    if not path.is_file():
        raise CheckpointError(f"model checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol before it fails: one line
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        raise CheckpointError(f"{str(path)!r} is not a readable profiles checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{str(path)!r} is not a profiles checkpoint (no format version)")
    if payload["format"] not in READABLE_FORMATS:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {payload['format']}; this version reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    try:
        return _read(payload, path, device)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a damaged or hand-edited payload
        raise CheckpointError(f"{str(path)!r} is damaged or was edited: {type(exc).__name__} {exc}") from None


def _read(payload: dict, path: Path, device: torch.device | str) -> LoadedModel:
    """The model of a checkpoint payload of a readable format: older formats brought up to this code's."""
    if payload["format"] == 3:  # affine calibration [a, b]: the same line through the knots
        for key in [k for k in payload["state_dict"] if k.endswith(".calibration")]:
            a, b = payload["state_dict"][key].tolist()
            knots = identity_knots(CALIBRATION_KNOTS)
            payload["state_dict"][key] = torch.stack([knots, a * knots + b])
        payload["state_dict"]["fields.gate_fit.weight"] = torch.zeros(1, 1)  # format 3's gate ignores the fit
    if payload["format"] < 5:  # no copy bonus: zero weights copy nothing, the scores stay those it was trained with
        state = payload["state_dict"]
        hidden = state["item_out.weight"].shape[1]
        for name, rows, width in (("item_copy", 1, hidden),
                                  ("category_copy", RECENT_CATEGORIES, state["category_head.weight"].shape[1])):
            state[f"{name}.weight"], state[f"{name}.bias"] = torch.zeros(rows, width), torch.zeros(rows)
    if payload["format"] < 10:  # heads fitted on times since in hours: keep reading them so; no session process
        state = payload["state_dict"]
        state["fields.hours_features"] = torch.tensor(True)
        for head in ("purchase", "event"):
            n = state[f"fields.{head}.linear.weight"].shape[1]
            state[f"fields.{head}.session.weight"] = torch.zeros(1, n)
            state[f"fields.{head}.session.bias"] = torch.tensor([SESSION_OFF])
            state[f"fields.{head}.log_session_hours"] = torch.tensor(0.0)
    if payload["format"] < 12:  # heads fitted on follow_pending relative to the top follow-up: keep reading it so
        payload["state_dict"]["fields.relative_pending"] = torch.tensor(True)
    if payload["format"] < 13:  # session processes fitted without the decay in the shop's pace: none
        for head in ("purchase", "event"):
            payload["state_dict"][f"fields.{head}.idle_decay"] = torch.tensor(False)
            payload["state_dict"][f"fields.{head}.log_step_scale"] = torch.tensor(0.0)
    if payload["format"] < 14:  # session processes that fade exponentially with idle steps (or not at all)
        for head in ("purchase", "event"):
            payload["state_dict"][f"fields.{head}.power_fade"] = torch.tensor(False)
            payload["state_dict"][f"fields.{head}.log_fade_power"] = torch.tensor(0.0)
    if payload["format"] < 15:  # return processes without the fall after a long silence
        for head in ("purchase", "event"):
            payload["state_dict"][f"fields.{head}.silence_power"] = torch.tensor(0.0)
            payload["state_dict"][f"fields.{head}.silence_minutes"] = torch.tensor(SILENCE_MINUTES)
    if payload["format"] < 11:  # no neighbour votes
        payload["state_dict"]["neighbour_weight"] = torch.zeros(1)
    if payload["format"] < 9:  # no transition bonus
        payload["state_dict"]["transition_weight"] = torch.zeros(2)
    # Slot features added since the heads were fitted (follow-ups < 6, visits < 7, popularity < 8, freshness < 16,
    # habit_freshness < 18, habit_count < 20): zero weights on them rank slots as they were fitted to, but for the
    # weights every model has set, below.
    weight = payload["state_dict"]["fields.repeat_score.weight"]
    weight = torch.cat([weight, torch.zeros(weight.shape[0], len(SLOT_FEATURES) - weight.shape[1])], dim=1)
    payload["state_dict"]["fields.repeat_score.weight"] = weight
    if payload["format"] < 17:  # no purchase rhythm features: zero weights on them (mean 0, spread 1) score as before
        state = payload["state_dict"]
        extra = HEAD_FEATURES - state["fields.feature_mean"].shape[0]
        state["fields.feature_mean"] = torch.cat([state["fields.feature_mean"], torch.zeros(extra)])
        state["fields.feature_std"] = torch.cat([state["fields.feature_std"], torch.ones(extra)])
        for key in _USER_FEATURE_WEIGHTS:
            state[key] = torch.cat([state[key], torch.zeros(state[key].shape[0], extra)], dim=1)
    if payload["format"] < 18:  # no habit_freshness feature: its weight is set, not fitted (HABIT_RECENCY_WEIGHT)
        weight[:, HABIT_FRESHNESS] = HABIT_RECENCY_WEIGHT
        payload["state_dict"]["fields.habit_lean_trained"] = torch.tensor(0.0)  # as if fitted where users keep staples
    if payload["format"] < 20:  # no habit_count feature: its weight is set (HABIT_COUNTS_WEIGHT). Heads whose field
        # stage counted the shop's habit (formats 18 and 19) serve as they did: it did not note how far the shop leaned
        # toward the counts at its earlier cuts (field_training.collect), and a lean taken at its last cut would undo
        # what heads fitted across a fashion shop's new season know. Older heads, the shipped demo's among them, are
        # read as fitted where users keep their staples but not that firmly (lean 0), as for the recency lean.
        weight[:, HABIT_COUNT] = HABIT_COUNTS_WEIGHT
        habit = payload.get("metadata", {}).get("fields", {}).get("habit") or {}
        payload["state_dict"]["fields.habit_counts_lean_trained"] = torch.tensor(1.0 if habit else 0.0)
        if "lean" in habit:  # their fit reset the lean toward the latest categories it had noted (session 52)
            payload["state_dict"]["fields.habit_lean_trained"] = torch.tensor(float(habit["lean"]))
    try:
        raw = dict(payload["config"])
        config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        model = ProfileModel(config)
        model.load_state_dict(payload["state_dict"])
        tables = payload.get("transitions", {})
        model.set_transitions(*(Transitions.from_arrays(tables[name]) if name in tables else None
                                for name in ("item", "category")))
        if "neighbours" in payload:
            model.set_neighbours(SessionNeighbours.from_arrays(payload["neighbours"]))
        if "catalogue" in payload:
            model.catalogue = ItemCatalogue.from_arrays(payload["catalogue"])
    except (TypeError, KeyError, RuntimeError) as exc:
        # load_state_dict lists every mismatched tensor over many lines under a heading: the first of them is enough
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise CheckpointError(f"{str(path)!r} does not match this model code: {lines[min(1, len(lines) - 1)]}"
                              + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")) from None
    broken = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:  # served, they publish null scores for every user, without a word
        raise CheckpointError(f"{str(path)!r} holds weights that are not finite numbers (nan or inf) in "
                              f"{len(broken)} tensor(s), e.g. {broken[0]}: a training run that diverged? Train again")
    vocab = list(payload.get("item_vocab", []))
    if len(vocab) != config.n_items and config.n_items:
        raise CheckpointError(f"{str(path)!r} has {len(vocab)} vocabulary items for a {config.n_items}-item head")
    model.to(device).eval()
    return LoadedModel(model, str(payload.get("model_version", "unknown")), True,
                       dict(payload.get("metadata", {})), vocab, int(payload["format"]))
