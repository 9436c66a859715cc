"""Q4Shampoo's per-shard state under FSDP2, as DTensors that distributed checkpoints save and load rank by rank.

Under FSDP2 a parameter is a DTensor and each rank preconditions its own row shard: the statistics, roots
and moments of rank r belong to rank r's rows. Left as plain tensors, that state looks *replicated* to
``torch.distributed.checkpoint``: DCP keeps one copy (rank 0's) of a plain tensor saved under the same key on
every rank, and ``get_optimizer_state_dict(full_state_dict=True)`` takes plain tensors from rank 0 as they
are. Every rank would then resume from rank 0's statistics: the silent failure other 4-bit optimizers have
there (torchao's 4-bit AdamW state under ``get_optimizer_state_dict``).

So :func:`wrap` turns every per-rank leaf of a parameter's state (uint8 codes and scales, int32 exponents, diagonals,
moments, the skip counter, the integer refresh offsets) into a 1-D DTensor sharded over the parameter's mesh
dimension: rank r's leaf flattened and zero-padded to the longest that leaf is on any rank, so every shard
has the same length (DCP's shards follow ``torch.chunk``). The lengths of the other ranks' leaves are not
communicated: they follow from the parameter's global shape and placement (:func:`shard_shapes`) through the
optimizer's own state construction on the meta device. :func:`unwrap` takes this rank's piece back, cut to
its own shape. The step counter is the same on every rank and stays a plain tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["shard_shapes", "wrap", "unwrap", "is_dtensor", "ShardedStateError"]

#: leaves that hold the same value on every rank (left as they are)
_REPLICATED = ("step",)


class ShardedStateError(ValueError):
    """A parameter's sharding that Q4Shampoo cannot express in a distributed checkpoint."""


def is_dtensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "to_local") and hasattr(t, "placements")


def shard_shapes(p: torch.Tensor) -> tuple[Any, list, list[tuple[int, ...]]] | None:
    """``(mesh, placements of a wrapped leaf, local shape of every shard index)`` of a DTensor parameter, or
    None when no mesh dimension shards it (replicated: every rank holds the same state).

    Supported: FSDP2's ``Shard(0)`` on one mesh dimension (HSDP adds a ``Replicate`` dimension), with the
    uneven ``torch.chunk`` split FSDP2 uses. Anything else raises :class:`ShardedStateError`.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, list(p.placements)
    sharded = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    if not sharded:
        return None
    if len(sharded) > 1 or type(placements[sharded[0]]) is not Shard or placements[sharded[0]].dim != 0:
        raise ShardedStateError(
            f"Q4Shampoo: a parameter of shape {tuple(p.shape)} is sharded as {placements}; sharded optimizer "
            "checkpoints support FSDP2's Shard(0) on one mesh dimension (plus Replicate, HSDP) only."
        )
    dim = sharded[0]
    world = mesh.size(dim)
    rows = p.shape[0]
    chunk = -(-rows // world)
    shapes = [(max(0, min(chunk, rows - i * chunk)), *p.shape[1:]) for i in range(world)]
    wrapped = [Shard(0) if i == dim else Replicate() for i in range(len(placements))]
    return mesh, wrapped, shapes


def _leaves(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(tree, list):
        return [leaf for i, v in enumerate(tree) for leaf in _leaves(v, (*path, i))]
    return [(path, tree)]


def _map(tree: Any, fn: Callable[[tuple, Any], Any], path: tuple = ()) -> Any:
    if isinstance(tree, dict):
        return {k: _map(v, fn, (*path, k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(v, fn, (*path, i)) for i, v in enumerate(tree)]
    return fn(path, tree)


def _length(leaf: Any) -> int:
    return leaf.numel() if isinstance(leaf, torch.Tensor) else 1


def wrap(
    state: dict[str, Any], p: torch.Tensor, expected: Callable[[tuple[int, ...]], dict[str, Any]], name: str
) -> dict[str, Any]:
    """``state`` (this rank's, of DTensor parameter ``p``) with every per-rank leaf as a sharded 1-D DTensor.

    ``expected(local_shape)`` is the state the optimizer creates for a shard of that shape (meta tensors):
    it gives every rank's leaf lengths. ``name`` names the parameter in errors.
    """
    from torch.distributed.tensor import DTensor

    layout = shard_shapes(p)
    if layout is None:
        return state
    mesh, placements, shapes = layout
    per_shard = [dict(_leaves(expected(shape))) for shape in shapes]
    paths = set(per_shard[0])
    if any(set(s) != paths for s in per_shard) or set(dict(_leaves(state))) != paths:
        raise ShardedStateError(
            f"Q4Shampoo: the shards of parameter {name} (local shapes {shapes}) have differently structured "
            "optimizer states (e.g. a shard too small to be preconditioned), which a sharded checkpoint cannot "
            "hold; shard the model so that every rank holds a part of each matrix, or save without FSDP."
        )
    longest = {path: max(_length(s[path]) for s in per_shard) for path in paths}
    device = p.to_local().device
    world = len(shapes)

    def to_dtensor(path: tuple, leaf: Any) -> Any:
        if path[-1] in _REPLICATED or not isinstance(leaf, torch.Tensor | int) or isinstance(leaf, bool):
            return leaf
        flat = leaf.reshape(-1) if isinstance(leaf, torch.Tensor) else torch.tensor([leaf], device=device)
        pad = longest[path] - flat.numel()
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        length = longest[path]
        return DTensor.from_local(
            flat.contiguous(), mesh, placements, run_check=False, shape=(world * length,), stride=(1,)
        )

    return _map(state, to_dtensor)


def unwrap(state: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """This rank's state back from :func:`wrap`'s form: each DTensor leaf cut to the length and shape of the
    ``expected`` leaf (the state this rank's shard has; an integer where that is an integer)."""
    target = dict(_leaves(expected))

    def from_dtensor(path: tuple, leaf: Any) -> Any:
        if not is_dtensor(leaf):
            return leaf
        local = leaf.to_local()
        want = target.get(path)
        if isinstance(want, torch.Tensor):
            return local[: want.numel()].reshape(want.shape).clone()
        if isinstance(want, int):
            return int(local[0])
        return local  # a leaf this shard does not expect: the shape check after this names it

    return _map(state, from_dtensor)
