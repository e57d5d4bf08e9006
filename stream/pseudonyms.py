"""Optional pseudonymisation: user ids replaced by a keyed HMAC before they reach state or outputs.

HMAC-SHA256(key, user id), hex, first 32 characters (128 bits): stable for a key, so profiles of
the same person still join across topics and restarts; without the key, not reversible and not
linkable to ids hashed elsewhere. Rotating the key starts every user afresh.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from stream.memo import map_memoised

PSEUDONYM_CHARS = 32
_MEMO_MAX = 2_000_000


class Pseudonymizer:
    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("--pseudonymize-key must not be empty")
        self._key = key.encode()
        self._memo: dict[str, str] = {}  # ids repeat: one HMAC per distinct id, not per event

    def __repr__(self) -> str:
        return "Pseudonymizer(key not shown)"

    def one(self, user_id: str) -> str:
        return hmac.new(self._key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[
            :PSEUDONYM_CHARS]

    @property
    def fingerprint(self) -> str:
        """The pseudonym of a fixed id no user has: equal for equal keys, and says nothing else about the key
        (a state snapshot records it, so that a daemon with another key refuses the snapshot's users)."""
        return self.one("\x00key fingerprint")

    def __contains__(self, user_id: str) -> bool:
        """Whether the raw id -> pseudonym mapping is held in memory."""
        return user_id in self._memo

    def forget(self, user_ids: list[str]) -> None:
        """Drop erased users' raw id -> pseudonym entries: an erasure leaves no trace of the raw id."""
        for user_id in user_ids:
            self._memo.pop(user_id, None)

    def __call__(self, user_ids: np.ndarray) -> np.ndarray:
        """Pseudonyms of an object array of user ids."""
        if len(self._memo) > _MEMO_MAX:
            self._memo.clear()
        names = map_memoised(self._memo, user_ids, self.one)
        out = np.empty(len(names), dtype=object)
        out[:] = names
        return out
