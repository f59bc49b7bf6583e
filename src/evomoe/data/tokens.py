"""A split's tokens over its memory-mapped shards, and the order in which training windows visit them.

``ShardedTokens`` reads like one flat array (``len``, integer-array indexing, slices) over shard files of
any total size: a window that crosses a shard boundary reads from both. Only the pages a batch touches
are read; no process loads the split.

``ShuffledWindows`` is ``data.order = "shuffled"``: pass ``e`` over the training split cuts it into
non-overlapping windows of ``seq_len + 1`` tokens (consecutive windows share one token: each token is an
input once and a target once per pass) from a random offset, and visits them in a random order; both are
drawn from ``(seed, e)``, so the windows of a step are a pure function of (seed, step).
"""

from __future__ import annotations

import numpy as np


class ShardedTokens:
    """The concatenation of ``parts`` (1-D arrays of token ids, e.g. memmaps), without copying them."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        if not parts:
            raise ValueError("ShardedTokens needs at least one part")
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def size(self) -> int:
        return len(self)

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)), dtype=np.int64)
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"token indices must be integers, not {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)})")
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][idx])
        flat = idx.reshape(-1)
        part = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for k in np.unique(part):
            rows = part == k
            out[rows] = self.parts[k][flat[rows] - self.starts[k]]
        return out.reshape(idx.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole split as one array (small splits and tests; large ones are read in windows)."""
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)


class ShuffledWindows:
    """Window starts for ``data.order = "shuffled"``: every pass visits each window of the split once."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int) -> None:
        self.n_tokens, self.seq_len, self.seed = n_tokens, seq_len, seed
        self._pass: tuple[int, np.ndarray, int] | None = None  # (pass, order, offset) of the last lookup
        if self.windows(0)[1] < 1:
            raise ValueError(f"the train split has {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")

    def windows(self, epoch: int) -> tuple[int, int]:
        """(offset, number of windows) of pass ``epoch``."""
        offset = int(np.random.default_rng([self.seed, epoch, 1]).integers(0, self.seq_len))
        if self.n_tokens - 1 - offset < self.seq_len:
            offset = 0
        return offset, (self.n_tokens - 1 - offset) // self.seq_len

    def order(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._pass is None or self._pass[0] != epoch:
            offset, n = self.windows(epoch)
            self._pass = (epoch, np.random.default_rng([self.seed, epoch, 2]).permutation(n), offset)
        return self._pass[1], self._pass[2]

    def starts(self, step: int, batch_size: int) -> np.ndarray:
        """Starts of the windows of ``step``: samples [step * B, (step + 1) * B) of the endless sequence of
        passes (a step may straddle two passes)."""
        out = np.empty(batch_size, dtype=np.int64)
        sample = step * batch_size
        filled = 0
        while filled < batch_size:
            epoch, pos = self.locate(sample + filled)
            order, offset = self.order(epoch)
            take = min(batch_size - filled, len(order) - pos)
            out[filled : filled + take] = offset + order[pos : pos + take] * self.seq_len
            filled += take
        return out

    def locate(self, sample: int) -> tuple[int, int]:
        """(pass, position in it) of the ``sample``-th window (passes may differ in length by one window)."""
        epoch = 0
        while True:
            n = self.windows(epoch)[1]
            if sample < n:
                return epoch, sample
            sample -= n
            epoch += 1
