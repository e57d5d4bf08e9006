"""State snapshots on disk (`profiles replay --state-out`, `profiles run --restore-from`): the arrays of
StateTable.snapshot() in state.npz, the rest in state.json."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import orjson

SNAPSHOT_FILES = ("state.npz", "state.json")  # what a snapshot directory holds


def write_snapshot(directory: str | Path, snapshot: dict, meta: dict) -> None:
    """A state snapshot on disk: arrays in state.npz, the rest (and `meta`) in state.json.

    Written to a temporary name and renamed, so a reader never sees half a snapshot.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in snapshot.items() if isinstance(v, np.ndarray)}
    plain = {k: v for k, v in snapshot.items() if not isinstance(v, np.ndarray)}
    plain["category_names"] = {str(k): v for k, v in plain["category_names"].items()}
    tmp_npz, tmp_json = directory / ".state.npz.tmp", directory / ".state.json.tmp"
    with open(tmp_npz, "wb") as fh:
        np.savez(fh, **arrays)
    tmp_json.write_bytes(orjson.dumps({"snapshot": plain, "meta": meta}))
    os.replace(tmp_npz, directory / SNAPSHOT_FILES[0])
    os.replace(tmp_json, directory / SNAPSHOT_FILES[1])


def read_snapshot(directory: str | Path) -> tuple[dict, dict]:
    """(snapshot for StateTable.restore, meta) from a directory written by write_snapshot."""
    directory = Path(directory)
    try:
        doc = orjson.loads((directory / "state.json").read_bytes())
        with np.load(directory / "state.npz", allow_pickle=False) as arrays:
            snapshot = {**doc["snapshot"], **{k: arrays[k] for k in arrays.files}}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{str(directory)!r} holds no readable state snapshot ({exc})") from None
    return snapshot, doc.get("meta", {})
