"""Collectives of tensor parallelism (the shard-tp pass inserts them; design.md §7).

A sharded module is one SPMD program: every rank runs the same functions on its own slice of
the weights, and these ops are where the ranks meet.  Their references take the inputs of ALL
ranks (rank order) and return every rank's result, so only the lockstep interpreter
(`interpreter.run_ranks`) can run them; native code calls the communicator
(backends/include/amxc_comm.h) from inside the step.

  all_reduce  every rank gets the sum of the ranks' x, added in rank order ((x0 + x1) + x2) ...:
              the same bits on every rank, whatever the timing (the row-parallel o_proj and
              down_proj partial sums)
  all_gather  every rank gets the ranks' x concatenated along the last axis (the vocab-split
              lm_head's logits)

and the one per-rank op tensor parallelism adds, `embedding_part`: a vocab-split embedding's
lookup (zeros for the ids another rank holds), followed by an all_reduce.
"""
from __future__ import annotations

import numpy as np

from ..attrs import Attr
from ..dtypes import i32, i64
from ..registry import register_op
from ._shapes import fail

COLLECTIVES = ("all_reduce", "all_gather")


def _check_ways(at):
    if at["ways"] < 2:
        fail(f"a collective needs ways >= 2, got {at['ways']}")


def _all_reduce_infer(ts, at):
    _check_ways(at)
    return [ts[0]]


@register_op("all_reduce", "x", {"ways": Attr("int")}, infer=_all_reduce_infer, native="kernel")
def all_reduce(*xs, ways):
    """Sum over the ranks, in rank order; every rank gets the sum."""
    if len(xs) != ways:
        raise ValueError(f"all_reduce of {ways} ways got {len(xs)} ranks' inputs")
    total = xs[0]
    for x in xs[1:]:
        total = (total + x).astype(xs[0].dtype)
    return [np.array(total) for _ in xs]


def _all_gather_infer(ts, at):
    _check_ways(at)
    x = ts[0]
    if x.rank < 1:
        fail(f"all_gather needs a tensor with a last axis, got {x}")
    return [x.with_shape(x.shape[:-1] + (x.shape[-1] * at["ways"],))]


@register_op("all_gather", "x", {"ways": Attr("int")}, infer=_all_gather_infer, native="kernel")
def all_gather(*xs, ways):
    """The ranks' x side by side along the last axis, on every rank."""
    if len(xs) != ways:
        raise ValueError(f"all_gather of {ways} ways got {len(xs)} ranks' inputs")
    out = np.concatenate(xs, axis=-1)
    return [np.array(out) for _ in xs]


def _embedding_part_infer(ts, at):
    w, ids, first = ts
    if w.rank != 2 or ids.dtype not in (i64, i32) or first.dtype != i64 or first.shape != (1,):
        fail(f"embedding_part needs a [rows, dim] table slice, integer ids and an i64[1] first row, got "
             f"{w}, {ids} and {first}")
    return [w.with_shape(ids.shape + (w.shape[1],))]


@register_op("embedding_part", "weight ids first", infer=_embedding_part_infer, native="kernel")
def embedding_part(weight, ids, first):
    """A vocab-split embedding's lookup on one rank: the rows of the ids this rank's slice holds
    (rows first .. first + len(weight) - 1 of the whole table), zeros for the others; the
    all_reduce after it completes every row exactly (one rank adds x, the rest 0)."""
    local = ids - first[0]
    held = (local >= 0) & (local < weight.shape[0])
    out = weight[np.where(held, local, 0)]
    out[~held] = 0
    return out
