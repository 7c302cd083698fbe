"""Length buckets: a small, fixed set of static batch shapes, so a compiled model never sees a new one.

A batch of token rows is padded to a shape (rows, length) taken from this set:

- length: the row's length rounded up to the next bucket length (e.g. 32, 64, 96, 128, ..., capped at the
  model's token limit, which is always the last bucket, so every row has a bucket);
- rows: `max_batch_tokens // length`, so every full batch costs about the same padded tokens.

A batch with fewer rows than its bucket holds (the tail of a length group, or a lone query) is either
padded up to the full row count (`Tail.PAD`: one shape per length, fewer compilations) or runs in the
smallest shape of a row ladder that fits it (`Tail.SMALLER`: rows 1, 4, 16, ... below the full count,
more compilations, far less padding for lone queries and tails, which `plan` splits along the
ladder). Dummy rows are all padding and are dropped
from the result; they never reach a caller.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Sequence
from dataclasses import dataclass

# Each length is one compilation at start-up; each token of padding is compute thrown away. On SciFact
# with the real Gemma 3 tokenizer (`make bench-buckets`, 2026-12-02) these 12 lengths compute 1.20x the
# passages' real tokens (efficiency 0.835 at a 16,384 budget); powers of two (6) 1.42x (0.703), and 20
# finer lengths 1.11x (0.904) for 8 more compilations. 32 is there for queries (mean 27 tokens): 0.656
# efficient with it, 0.417 with 64 the shortest.
DEFAULT_BUCKET_LENGTHS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


class Tail(enum.Enum):
    PAD = "pad"  # pad a short batch up to its bucket's full row count
    SMALLER = "smaller"  # run it in the smallest shape of the row ladder that fits it


@dataclass(frozen=True)
class LengthBuckets:
    """Static shapes (rows, length) for a padded-token budget. Build it with `LengthBuckets.create`."""

    lengths: tuple[int, ...]  # ascending; the last is the model's token limit
    max_batch_tokens: int
    tail: Tail = Tail.SMALLER
    row_step: int = 4  # the row ladder below a bucket's full count: 1, step, step**2, ...

    @classmethod
    def create(
        cls,
        lengths: Sequence[int] | str | None,
        *,
        max_tokens: int,
        max_batch_tokens: int,
        tail: Tail | str = Tail.SMALLER,
        row_step: int = 4,
    ) -> LengthBuckets:
        """Bucket lengths above `max_tokens` are dropped and `max_tokens` itself is always a bucket."""
        if lengths is None or lengths == "" or lengths == "auto":
            lengths = DEFAULT_BUCKET_LENGTHS
        if isinstance(lengths, str):
            lengths = [int(part) for part in lengths.split(",") if part.strip()]
        if any(length < 1 for length in lengths):
            raise ValueError(f"bucket lengths must be positive, got {list(lengths)}")
        if row_step < 2:
            raise ValueError(f"row step must be at least 2, got {row_step}")
        kept = sorted({length for length in lengths if length < max_tokens} | {max_tokens})
        return cls(tuple(kept), max_batch_tokens, Tail(tail), row_step)

    def length_for(self, tokens: int) -> int:
        """The smallest bucket length that holds `tokens`; ValueError beyond the last bucket."""
        index = bisect.bisect_left(self.lengths, tokens)
        if index == len(self.lengths):
            raise ValueError(f"{tokens} tokens exceed the largest bucket ({self.lengths[-1]})")
        return self.lengths[index]

    def full_rows(self, length: int) -> int:
        """Rows of a full batch at this bucket length: the budget divided by the length, at least one."""
        return max(1, self.max_batch_tokens // length)

    def row_ladder(self, length: int) -> tuple[int, ...]:
        """Row counts a batch of this bucket length may be padded to, ascending; the last is the full count."""
        full = self.full_rows(length)
        if self.tail is Tail.PAD:
            return (full,)
        ladder = []
        rows = 1
        while rows < full:
            ladder.append(rows)
            rows *= self.row_step
        return (*ladder, full)

    def shape_for(self, rows: int, longest: int) -> tuple[int, int]:
        """The static shape (rows, length) a batch of `rows` rows, the longest `longest` tokens, runs in."""
        length = self.length_for(longest)
        ladder = self.row_ladder(length)
        index = bisect.bisect_left(ladder, rows)
        if index == len(ladder):
            raise ValueError(f"{rows} rows exceed the {ladder[-1]} rows of the {length}-token bucket")
        return ladder[index], length

    def shapes(self) -> list[tuple[int, int]]:
        """Every static shape a batch can run in: what warm-up compiles. Smallest first."""
        return [(rows, length) for length in self.lengths for rows in self.row_ladder(length)]

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Group row indices into batches of one bucket length each, at most its full row count.

        Every index appears exactly once. Longest bucket first (as `plan_batches`); within a bucket,
        rows keep the length-sorted order, longest first, so results are deterministic. Under
        Tail.SMALLER the rows left after the full batches are split along the row ladder (a tail of 100
        with ladder 1, 4, 16, 64, 256 runs as 64 + 16 + 16 + 4) until padding the rest up wastes at
        most a quarter of its shape.
        """
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        groups: list[list[int]] = []
        group_length = 0
        for index in order:
            length = self.length_for(lengths[index])
            if not groups or length != group_length:
                groups.append([])
                group_length = length
            groups[-1].append(index)
        batches: list[list[int]] = []
        for group in groups:
            ladder = self.row_ladder(self.length_for(lengths[group[0]]))
            start = 0
            while start < len(group):
                remaining = len(group) - start
                size = min(remaining, ladder[-1])
                if self.tail is Tail.SMALLER and size < ladder[-1]:
                    padded_up = ladder[bisect.bisect_left(ladder, size)]
                    if size < 0.75 * padded_up:
                        size = ladder[bisect.bisect_right(ladder, size) - 1]  # a smaller shape, filled
                batches.append(group[start : start + size])
                start += size
        return batches

    def padded_tokens(self, lengths: Sequence[int]) -> int:
        """Tokens the planned batches compute, dummy rows and padding included (for efficiency figures)."""
        total = 0
        for batch in self.plan(lengths):
            rows, length = self.shape_for(len(batch), max(lengths[i] for i in batch))
            total += rows * length
        return total
