"""The items a model was trained on, and the category each was seen in: what lets it tell an item it knows
from one it does not.

An item id is only a name. Another shop, a new season's catalogue or a generator's other seed can give the
same id to another product ("S100185": fish tanks in one log, garden seeds in the next), and an id never seen
in training hashes into a bucket that some other item trained. Either way the model reads the embedding and
the follow-ups of a product the user never touched: a model trained on one generated world and served on the
next ranked categories 0.015-0.040 behind "most recent categories" there, 0.004 ahead when the same events
named their items as the training log did (docs/model-journal.md, session 49).

So the checkpoint keeps the training log's items, by the raw hash of their id (models/features.py), with the
category each was mostly seen in. At serving, an item is the one the model knows when its id is in the
catalogue and the event's category agrees (or either has none); any other item is read as an unknown item:
the "no item" bucket and no vocabulary row, the category and the rest of the event as they are. Training
reads a share of its own items as unknown (ModelConfig.unknown_items), so the sequence model learns what an
event says without its item. A checkpoint without a catalogue (before format 19) knows every item, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ItemCatalogue:
    """Sorted raw hashes of the training log's item ids (uint64, crc32 + 1) and each one's category key
    (uint32; 0: seen without a category)."""

    hashes: np.ndarray
    categories: np.ndarray

    @classmethod
    def from_events(cls, item_hash: np.ndarray, category_key: np.ndarray) -> "ItemCatalogue":
        """From the training events' item hashes (0: no item) and category keys: each item with the category
        it was seen in most often (the larger key on a tie)."""
        has = item_hash > 0
        pair_item, pair_cat = item_hash[has].astype(np.uint64), category_key[has].astype(np.uint64)
        pairs, counts = np.unique(np.stack([pair_item, pair_cat], axis=1), axis=0, return_counts=True)
        if len(pairs) == 0:
            return cls.empty()
        # Per item, the pair seen most often: sort by (item, count, category) and keep each item's last.
        order = np.lexsort((pairs[:, 1], counts, pairs[:, 0]))
        pairs = pairs[order]
        last = np.append(pairs[1:, 0] != pairs[:-1, 0], True)
        return cls(pairs[last, 0].copy(), pairs[last, 1].astype(np.uint32))

    @classmethod
    def empty(cls) -> "ItemCatalogue":
        """A catalogue that knows no item."""
        return cls(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint32))

    def __len__(self) -> int:
        return len(self.hashes)

    def known(self, item_hash: np.ndarray, category_key: np.ndarray) -> np.ndarray:
        """(N,) bool: the event's item is one the model was trained on (an event without an item: True)."""
        item_hash = np.asarray(item_hash, dtype=np.uint64)
        if len(self.hashes) == 0:
            return item_hash == 0
        at = np.minimum(np.searchsorted(self.hashes, item_hash), len(self.hashes) - 1)
        trained = self.categories[at]
        category_key = np.asarray(category_key)
        agrees = (trained == 0) | (category_key == 0) | (trained == category_key)
        return (item_hash == 0) | ((self.hashes[at] == item_hash) & agrees)

    def arrays(self) -> dict[str, torch.Tensor]:
        """Plain int64 tensors for a checkpoint (raw hashes and keys are below 2**33)."""
        return {"hashes": torch.from_numpy(self.hashes.astype(np.int64)),
                "categories": torch.from_numpy(self.categories.astype(np.int64))}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor]) -> "ItemCatalogue":
        return cls(arrays["hashes"].numpy().astype(np.uint64), arrays["categories"].numpy().astype(np.uint32))
