"""What follows what in the training log: the sequential rules' counts, as a score the model weighs.

After an event of class a (an item of the next-item vocabulary, or a category bucket), the next event
of the same user was of class b count[a, b] times in the training log. Sequential rules rank the
next class by that count alone; on small logs they beat a GRU that has to learn every transition
into its output vectors from a handful of examples (REES46 slice: next-category accuracy@5 0.910 vs
0.905, MRR@20 0.298 vs 0.300). The model adds w * log(1 + count[a, b]) to class b's score,
with w fitted after training on the validation period (sequence_training.fit_transition_weights).

Why not learned with the GRU: in training, the GRU has already memorised the transitions of the
events it learns from, so the counts add little there and their weight stayed small (REES46: learned
0.5-1.4, where 2-4 was best on the test period); on events it has not seen, the counts generalise
better than the memorised vectors. A weight chosen on held-out time sees that.

Stored as CSR, at most `per_row` successors per class (the most frequent), in torch tensors that
travel with the model to its device; a checkpoint holds them beside the state dict.
"""

from __future__ import annotations

import numpy as np
import torch

PER_ROW = 100  # successors kept per class: the rules' top candidates, and a bounded checkpoint


def successor_counts(a: np.ndarray, b: np.ndarray, n: int, per_row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How often b[i] followed a[i] (classes in [0, n)), as CSR (indptr, cols, counts; int64): row r's
    successors are cols[indptr[r]:indptr[r+1]], most frequent first (ties by column), at most per_row."""
    key, count = np.unique(a.astype(np.int64) * n + b.astype(np.int64), return_counts=True)
    row, col = key // n, key % n
    order = np.lexsort((col, -count, row))
    row, col, count = row[order], col[order], count[order]
    keep = np.arange(len(row)) - np.searchsorted(row, row, side="left") < per_row
    row, col, count = row[keep], col[keep], count[keep].astype(np.int64)
    return np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n))]).astype(np.int64), col, count


def ragged_positions(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The runs [starts[i], starts[i] + lengths[i]) of a CSR array laid end to end, in one gather: each element's
    run i, and its position in the array."""
    run = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths  # where each run starts in the result
    return run, starts[run] + torch.arange(len(run), device=starts.device) - offsets[run]


class Transitions:
    """count[a, b] of a -> b over `n` classes, CSR: row a's columns cols[indptr[a]:indptr[a+1]]."""

    def __init__(self, indptr: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor) -> None:
        self.indptr, self.cols, self.counts = indptr.long(), cols.long(), counts.float()
        self.log_counts = torch.log1p(self.counts)

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def empty(cls, n: int) -> Transitions:
        return cls(torch.zeros(n + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0))

    @classmethod
    def from_pairs(cls, a: np.ndarray, b: np.ndarray, n: int, per_row: int = PER_ROW) -> Transitions:
        """Count the pairs (a[i], b[i]) (classes in [0, n)); keep each row's `per_row` most frequent."""
        return cls(*(torch.from_numpy(x) for x in successor_counts(a, b, n, per_row)))

    def arrays(self) -> dict[str, torch.Tensor]:
        """Plain tensors for a checkpoint (see `from_arrays`)."""
        return {"indptr": self.indptr.cpu(), "cols": self.cols.cpu(), "counts": self.counts.cpu()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor]) -> Transitions:
        return cls(arrays["indptr"], arrays["cols"], arrays["counts"])

    def scores(self, weight: torch.Tensor, current: torch.Tensor, columns: torch.Tensor | None, width: int
               ) -> torch.Tensor:
        """(U, width) scores: weight[u] * log(1 + count[current[u], b]) at class b's column, 0 elsewhere.

        weight: (U,) or one for all; current: (U,), -1 (or outside the table): nothing. columns: the
        sorted classes the columns stand for (None: all `width` classes, in order)."""
        users = len(current)
        out = torch.zeros(users, width, dtype=weight.dtype, device=weight.device)
        if len(self.cols) == 0:  # untrained, or a log without two events in a row
            return out
        weight = weight.expand(users)
        known = (current >= 0) & (current < self.n)
        cur = torch.where(known, current, 0)
        starts = self.indptr[cur]
        lengths = torch.where(known, self.indptr[cur + 1] - starts, 0)
        if int(lengths.sum()) == 0:
            return out
        rows, at = ragged_positions(starts, lengths)
        cls, value = self.cols[at], self.log_counts[at]
        if columns is not None:
            col = torch.searchsorted(columns, cls).clamp(max=len(columns) - 1)
            hit = columns[col] == cls
            rows, cls, value = rows[hit], col[hit], value[hit]
        return out.index_put((rows, cls), weight[rows] * value.to(weight.dtype), accumulate=True)
