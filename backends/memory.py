"""The workspace plan: every intermediate tensor of a step gets an offset in one arena, and two
tensors share bytes only if their live ranges (first write, last read, in node order) do not
overlap.  Greedy best-fit, largest first — the classic offset assignment of TFLite and TVM's
static memory planners — is near-optimal on the chain-shaped graphs of decoder layers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Buffer:
    name: str
    size: int          # bytes, at the largest sizes the step is planned for
    start: int         # index of the node that writes it
    end: int           # index of the last node that reads it
    symbol: str = ""   # its C++ offset constant
    offset: int | None = None   # bytes into the workspace, once planned


def plan_offsets(buffers: list[Buffer], align: int = 64) -> tuple[list[int], int]:
    """(offset of each buffer, arena size)."""
    placed: list[tuple[int, int, Buffer]] = []             # (offset, size, buffer)
    offsets: dict[int, int] = {}
    for i in sorted(range(len(buffers)), key=lambda i: (-buffers[i].size, buffers[i].start)):
        b = buffers[i]
        busy = sorted((off, off + size) for off, size, other in placed
                      if not (other.end < b.start or b.end < other.start))
        at = 0
        for lo, hi in busy:
            if at + b.size <= lo:
                break
            at = max(at, -(-hi // align) * align)
        offsets[i] = at
        placed.append((at, b.size, b))
    total = max((off + size for off, size, _ in placed), default=0)
    return [offsets[i] for i in range(len(buffers))], -(-total // align) * align
