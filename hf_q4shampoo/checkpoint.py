"""Checkpoints of :class:`~hf_q4shampoo.Q4Shampoo`: ``state_dict`` / ``load_state_dict`` and the checks that refuse a
state this optimizer cannot continue from (another optimizer's, other storage options, other shapes, another
rank's share under DDP), for one process, DDP's split work and FSDP2's sharded (DTensor) state.

A mixin of ``Q4Shampoo`` (its own module because checkpointing is a job of its own); it reads the optimizer's
config, layout and DDP split through ``self``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from . import log_scales, quant
from .blocking import local_tensor as _local
from .config import LEGACY_STATE_LAYOUT, SHAPE_DECIDED_KEYS, STATE_LAYOUT_KEYS, ConfigError, Q4ShampooConfig
from .distributed import DdpSplit, strip_statistics
from .quant import SCALE_DTYPE
from .sharded_state import is_dtensor, unwrap, wrap

__all__ = [
    "CheckpointMixin",
    "detach_views",
    "restore_state",
    "state_mismatch",
    "step_tensor",
    "upgrade_moment_scales",
]

_SHARE_WARNING = (
    "Q4Shampoo: under DDP each rank keeps the statistics of its share of the matrices (shard_preconditioners), so "
    "this state_dict() holds this rank's share only and loads only into the same rank of the same world size. "
    "For a checkpoint that resumes, call optimizer.consolidate_state_dict() on every rank first (Q4ShampooTrainer "
    "does it before saving optimizer.pt), or set shard_preconditioners=false."
)


class CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` of Q4Shampoo (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the config (``q4shampoo_config``).

        Under DDP with the work split, each rank holds the statistics of its share of the matrices only: the
        state dict is then this rank's share, marked ``q4shampoo_shard: {"rank", "world_size"}`` (it loads
        only into the same rank of the same world size), unless :meth:`consolidate_state_dict` ran just before
        on every rank, in which case rank ``to`` gets the whole, world-size-independent state once.
        """
        consolidated = self.__dict__.pop("_consolidated", None)
        if consolidated is not None:
            return consolidated
        sd = self._plain_state_dict()
        split = self._ddp_split() if any(self.state.values()) else None
        if split is not None:
            sd["q4shampoo_shard"] = {"rank": split.rank, "world_size": split.world_size}
            if not self.__dict__.get("_warned_share"):
                self._warned_share = True
                warnings.warn(_SHARE_WARNING, stacklevel=2)
        return sd

    def consolidate_state_dict(self, to: int | None = 0) -> None:
        """Gather every rank's share of the state so that the next :meth:`state_dict` on rank ``to`` (every
        rank if None) returns the whole state, as one process would have it.

        A collective under DDP with the work split: every rank must call it (``Q4ShampooTrainer`` does before
        it saves ``optimizer.pt``); elsewhere it does nothing. The whole state is the single-process one, so
        it loads into any world size (each rank keeps its share) or into a single process. The gathered copy
        lives on the CPU of rank ``to`` and is handed out once.
        """
        split = self._ddp_split()
        if split is None:
            return
        sd = self._plain_state_dict()
        owners = self._owners()
        params = [p for g in self.param_groups for p in g["params"]]
        theirs = [index for index, p in enumerate(params) if owners.get(id(p)) not in (None, to)]
        owned = {i: _to_cpu(sd["state"][i]) for i in theirs if owners[id(params[i])] == split.rank and i in sd["state"]}
        gathered = split.gather_states(owned, to)
        if gathered is None:
            return
        for share in gathered:
            sd["state"].update(share)
        self._consolidated = sd

    def _plain_state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # The per-parameter state tensors are views of the layout's stacked buffers: give the checkpoint
        # independent tensors (a view would serialise its whole buffer under some checkpoint writers).
        sd["state"] = {index: detach_views(value) for index, value in sd["state"].items()}
        sd["q4shampoo_config"] = self.config.to_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        if any(is_dtensor(p) for p in params):
            # FSDP2: each rank's state is its shard's, as DTensors that distributed checkpoints keep per rank
            # (sharded_state.py); and the config also rides in the groups, which get_optimizer_state_dict keeps
            # (it drops other top-level keys)
            for index, value in sd["state"].items():
                if is_dtensor(params[index]):
                    p = params[index]
                    sd["state"][index] = wrap(
                        value, p, lambda shape, p=p: self._meta_state(shape, p.dtype), _param_name(self, index)
                    )
            for group in sd["param_groups"]:
                group["q4shampoo_config"] = sd["q4shampoo_config"]
        return sd

    def _meta_state(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The state this optimizer creates for a (local) parameter of ``shape``, on the meta device."""
        state: dict[str, Any] = {}
        self._init_state(torch.empty(shape, dtype=dtype, device="meta"), state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping every state tensor's saved dtype (uint8 codes stay uint8).

        torch's base class casts floating-point state to the parameter's dtype; that would turn
        4-bit codes into floats and fp32 statistics into bf16. We let it do the bookkeeping, then
        put back the saved tensors, moved to each parameter's device. A ``step`` saved as a plain
        number (torch's older format) is accepted.

        Refused, before anything changes (:class:`ConfigError`):

        * a state dict that Q4Shampoo did not save (e.g. ``torch.optim.AdamW``'s, when a run switches
          ``--optim`` and resumes). We refuse rather than convert: AdamW's moments could be re-encoded, but
          there are no Shampoo statistics to resume, and a silent conversion would also hide the far more
          common mistake of resuming the wrong checkpoint. The message says how to start Q4Shampoo fresh;
        * one made with other values of any option that decides how the state is laid out or decoded
          (the config fields flagged as state fields, ``STATE_LAYOUT_KEYS``; ``quant_map`` included);
        * one whose saved state does not fit a parameter's shape (parameters in another order, or another
          model): the message names the parameter.
        """
        state_dict = self._from_sharded_form(state_dict)
        saved_cfg = state_dict.get("q4shampoo_config")
        if not isinstance(saved_cfg, Mapping):
            raise ConfigError(_foreign_state_message(state_dict))
        shape_decided = self._check_saved_options(saved_cfg)
        split = self._ddp_split()
        share = state_dict.get("q4shampoo_shard")
        if share is not None:
            _check_share(share, split)
        saved_state = state_dict["state"]
        self._check_saved_shapes(state_dict, is_share=share is not None, saved_options=shape_decided)
        inner = {k: v for k, v in state_dict.items() if k not in ("q4shampoo_config", "q4shampoo_shard")}
        super().load_state_dict(inner)
        params = [p for group in self.param_groups for p in group["params"]]
        foreign = self._foreign_ids()
        for index, p in enumerate(params):
            if id(p) in foreign:  # shard_parameters: another rank updates this parameter and holds all its state
                self.state.pop(p, None)
            elif index in saved_state:
                device = _local(p).device
                self.state[p] = restore_state(saved_state[index], device)
                _add_missing_keys(self.state[p], device)
                if self._statistics_elsewhere(p):
                    strip_statistics(self.state[p])  # the whole state: keep this rank's share (re-sharding)
        self._layout_version += 1
        self.__dict__.pop("_layout", None)

    def _from_sharded_form(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """A state dict as ``set_optimizer_state_dict`` hands it over under FSDP2, in the plain form.

        There the state is keyed by parameter names (matched to parameters by position in the groups, as
        torch's ``load_state_dict`` does): keyed here by position instead; the config comes from the groups;
        and each DTensor-wrapped state is cut back to this rank's shard (sharded_state.py).
        """
        out = dict(state_dict)
        groups = out.get("param_groups")
        if not (isinstance(groups, list) and all(isinstance(g, Mapping) and "params" in g for g in groups)):
            return out  # torch's own checks name what is wrong
        if groups and "q4shampoo_config" in groups[0]:
            out.setdefault("q4shampoo_config", groups[0]["q4shampoo_config"])
        saved_ids = [pid for g in groups for pid in g["params"]]
        out["param_groups"], start = [], 0
        for g in groups:
            ids = list(range(start, start + len(g["params"])))
            out["param_groups"].append({**{k: v for k, v in g.items() if k != "q4shampoo_config"}, "params": ids})
            start += len(ids)
        state = out.get("state")
        if isinstance(state, Mapping) and saved_ids != list(range(len(saved_ids))):
            state = {pos: state[pid] for pos, pid in enumerate(saved_ids) if pid in state}
        if isinstance(state, Mapping):
            params = [p for g in self.param_groups for p in g["params"]]
            out["state"] = {
                pos: unwrap(value, self._meta_state(tuple(_local(params[pos]).shape), params[pos].dtype))
                if isinstance(pos, int) and pos < len(params) and is_dtensor(params[pos])
                else value
                for pos, value in state.items()
            }
        return out

    def _check_saved_options(self, saved: Mapping[str, Any]) -> str:
        """Refuse a checkpoint made with other values of the options that decide how state is read (a key
        missing from an older checkpoint had the layout it implies, ``LEGACY_STATE_LAYOUT``, or its default then).

        Options in ``SHAPE_DECIDED_KEYS`` are the exception: another value of them only changes the state's keys
        or shapes, and only of some parameters, so where every saved state fits (:meth:`_check_saved_shapes`)
        the state means the same under both. Returns their differences for that check's message ("" if none)."""
        defaults = Q4ShampooConfig()
        saved_values = {k: saved.get(k, LEGACY_STATE_LAYOUT.get(k, getattr(defaults, k))) for k in STATE_LAYOUT_KEYS}
        diffs = [k for k, v in saved_values.items() if v != getattr(self.config, k)]

        def detail(keys: list[str]) -> str:
            return ", ".join(f"{k}: saved {saved_values[k]!r}, now {getattr(self.config, k)!r}" for k in keys)

        hard = [k for k in diffs if k not in SHAPE_DECIDED_KEYS]
        if hard:
            raise ConfigError(
                "Q4Shampoo: the checkpoint's optimizer state was made with other storage options "
                f"({detail(hard)}); construct the optimizer with the saved values to resume."
            )
        return detail(diffs)

    def _check_saved_shapes(
        self, state_dict: Mapping[str, Any], is_share: bool = False, saved_options: str = ""
    ) -> None:
        """Compare each saved parameter state with the state this optimizer would create for the parameter
        it will be loaded into (built on the meta device: no memory), naming the first that does not fit.
        ``is_share``: the state is this rank's share (parameters whose statistics live elsewhere have roots only).
        ``saved_options``: differing ``SHAPE_DECIDED_KEYS`` options, named as the likely cause of a mismatch."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return  # torch's own check names the group-size mismatch
        saved_state = state_dict["state"]
        for gi, (saved_group, group) in enumerate(zip(saved_groups, self.param_groups)):
            names = group.get("param_names") or saved_group.get("param_names")
            for position, (saved_id, p) in enumerate(zip(saved_group["params"], group["params"])):
                if saved_id not in saved_state:
                    continue
                local = _local(p)
                expected: dict[str, Any] = {}
                self._init_state(torch.empty(local.shape, dtype=local.dtype, device="meta"), expected)
                if is_share and self._statistics_elsewhere(p):
                    strip_statistics(expected)
                # a copy on the meta device: the caller's state dict stays as it is, and an older layout is
                # upgraded in shape only (the real upgrade runs once, on the loaded state)
                saved = restore_state(saved_state[saved_id], torch.device("meta"))
                _add_missing_keys(saved, torch.device("meta"))
                problem = state_mismatch(saved, expected, "")
                if problem:
                    name = repr(names[position]) if names else f"#{position} of group {gi}"
                    cause = (
                        f"The checkpoint's optimizer state was made with other storage options ({saved_options}); "
                        "construct the optimizer with the saved values to resume."
                        if saved_options
                        else "The checkpoint's parameters are in another order or have other shapes; load it into "
                        "an optimizer over the same parameters, in the same order."
                    )
                    raise ConfigError(
                        f"Q4Shampoo: the saved state of parameter {name} (shape {tuple(local.shape)}) does not fit "
                        f"it: {problem}. {cause}"
                    )


def _param_name(opt: torch.optim.Optimizer, index: int) -> str:
    """The name of parameter ``index`` (position over all groups) for messages, as its group knows it."""
    for group in opt.param_groups:
        if index < len(group["params"]):
            names = group.get("param_names")
            return repr(names[index]) if names else f"#{index}"
        index -= len(group["params"])
    return f"#{index}"


def _check_share(share: Mapping[str, Any], split: DdpSplit | None) -> None:
    """Refuse a state dict that holds another rank's share (or a share from another world size)."""
    rank, world = share.get("rank"), share.get("world_size")
    here_rank, here_world = (split.rank, split.world_size) if split is not None else (0, 1)
    if split is not None and (rank, world) == (here_rank, here_world):
        return
    raise ConfigError(
        f"Q4Shampoo: this optimizer state holds only rank {rank}'s share of the statistics (saved with world size "
        f"{world}), but it is being loaded into rank {here_rank} of world size {here_world}. A share resumes only "
        "on the same rank of the same world size. Save the whole state instead (optimizer.consolidate_state_dict() "
        "on every rank before state_dict(); Q4ShampooTrainer does this), which loads into any world size."
    )


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _foreign_state_message(state_dict: Any) -> str:
    """Why a state dict without Q4Shampoo's config is refused, and what to do instead."""
    keys: set[str] = set()
    state = state_dict.get("state", {}) if isinstance(state_dict, Mapping) else {}
    for value in state.values() if isinstance(state, Mapping) else ():
        if isinstance(value, Mapping):
            keys.update(map(str, value))
    seen = f" (its per-parameter state has {', '.join(sorted(keys))})" if keys else ""
    return (
        f"Q4Shampoo: this optimizer state dict was not saved by Q4Shampoo{seen}, e.g. it is torch.optim.AdamW's. "
        "Q4Shampoo cannot continue another optimizer's state (its moments are stored differently and there are "
        "no Shampoo statistics). To switch optimizers mid-run, start Q4Shampoo's state fresh: do not load this "
        "state dict (with the Trainer: remove optimizer.pt from the checkpoint folder before resuming; the "
        "learning-rate schedule then restarts too), or resume with the optimizer that saved it."
    )


def state_mismatch(saved: Any, expected: Any, path: str) -> str | None:
    """The first difference in structure or tensor shape between a saved and an expected state, or None."""
    where = path or "the state"
    if isinstance(expected, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return f"{where} is {type(saved).__name__}, not a tensor"
        if tuple(saved.shape) != tuple(expected.shape):
            return f"{where} has shape {tuple(saved.shape)} in the checkpoint, {tuple(expected.shape)} expected"
        return None
    if isinstance(expected, Mapping):
        if not isinstance(saved, Mapping):
            return f"{where} is not a dict"
        if set(saved) != set(expected):
            extra, missing = sorted(set(saved) - set(expected)), sorted(set(expected) - set(saved))
            return f"{where} has keys {extra} where {missing} are expected" if extra else f"{where} lacks {missing}"
        for key in expected:
            if key in ("step", "refresh_offset", "root_offset"):
                continue  # counters and schedule offsets: any value fits
            problem = state_mismatch(saved[key], expected[key], f"{path}.{key}" if path else str(key))
            if problem:
                return problem
        return None
    if isinstance(expected, list):
        if not isinstance(saved, list) or len(saved) != len(expected):
            return f"{where} has {len(saved) if isinstance(saved, list) else 'no'} entries, {len(expected)} expected"
        for i, (a, b) in enumerate(zip(saved, expected)):
            problem = state_mismatch(a, b, f"{path}[{i}]")
            if problem:
                return problem
    return None


def detach_views(value: Any) -> Any:
    """``value`` with every tensor that is a view replaced by a copy of its own (a view would serialise its whole
    base buffer under some checkpoint writers)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value._base is not None else value
    if isinstance(value, dict):
        return {k: detach_views(v) for k, v in value.items()}
    if isinstance(value, list):
        return [detach_views(v) for v in value]
    return value


def _add_missing_keys(state: dict[str, Any], device: torch.device) -> None:
    """Fill state keys that checkpoints of earlier versions lack (the Cholesky forms' ``jitter``: 1; the
    root offset: the statistics offset, which earlier versions used for both; the skip counter: 0; the scale
    exponent of the factor's and the roots' block scales, which are then stored in their one-byte form)."""
    if "refresh_offset" in state and "root_offset" not in state:
        state["root_offset"] = state["refresh_offset"]
    if "skipped_updates" not in state:
        state["skipped_updates"] = torch.zeros((), dtype=torch.int64, device=device)
    for sides in state.get("regions", []):
        for side in sides.values():
            if "ridge" in side and "jitter" not in side:
                side["jitter"] = torch.ones_like(side["ridge"])
            _scales_to_bytes(side, _SIDE_LOG_SCALED, dims=2)
            _normalise_root_diagonal(side)
    upgrade_moment_scales(state)


def _normalise_root_diagonal(side: dict[str, Any]) -> None:
    """A root diagonal saved in fp32 (before 2026-12-02) as fp16 over its largest entry (``root_diag_scale``;
    ``quant.normalised_diagonal``): within 2^-11 of each entry until the next refresh."""
    diag = side.get("root_diag")
    if not isinstance(diag, torch.Tensor) or "root_diag_scale" in side:
        return
    if diag.device.type == "meta":
        side["root_diag"] = torch.empty(diag.shape, dtype=torch.float16, device="meta")
        side["root_diag_scale"] = torch.empty(diag.shape[:-1], dtype=torch.float32, device="meta")
        return
    stored = quant.normalised_diagonal(diag)
    side["root_diag"], side["root_diag_scale"] = stored["diag"], stored["diag_scale"]


def _to_bf16(state: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Entries saved in fp32 before they were stored in bf16 (2026-12-02: v's rank-1 maxima), rounded to nearest:
    a maximum until the next step."""
    for key in keys:
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            state[key] = value.to(torch.bfloat16)


def upgrade_moment_scales(state: dict[str, Any]) -> None:
    """A parameter's first-order moments saved with bf16 block scales (and fp32 rank-1 maxima), in today's form
    (in place; see ``_scales_to_bytes``): for every optimizer that stores :mod:`hf_q4shampoo.moments`."""
    _scales_to_bytes(state, _MOMENT_LOG_SCALED, dims=2)  # (1, blocks) per parameter: a 0-dim exponent
    _to_bf16(state, tuple(k for k in state if isinstance(k, str) and k.startswith("exp_avg_sq_max")))


#: the block scales stored as one log-grid byte since 2026-12-02: (scales, a second scale tensor sharing their
#: exponent (the factor's per-row scale of the straddling block) or None, the exponent's key); the side states'
#: exponents are one per matrix of a stacked side, the moments' one per parameter (a 0-dim tensor)
_SIDE_LOG_SCALED = (
    ("factor_scales", "factor_diag_block_upper_scale", "factor_scale_exp"),
    ("root_scales", None, "root_scale_exp"),
    ("root_res_scales", None, "root_res_scale_exp"),
)
_MOMENT_LOG_SCALED = tuple(
    (f"{m}_scales", None, f"{m}_scale_exp") for m in ("exp_avg", "exp_avg_sq", "momentum_buffer")
)


def _scales_to_bytes(state: dict[str, Any], entries: tuple[tuple[str, str | None, str], ...], dims: int) -> None:
    """Block scales saved in bf16 (or fp32) before they took one byte each (``log_scales``), turned into the
    bytes and exponent of the scale grid's nearest points: each decoded entry moves by at most 2.2% of its
    block's largest one until its next re-encoding (the same one-off rounding as the fp32 -> bf16 change of
    2026-12-01). ``dims``: the scales' trailing dimensions one exponent covers. On the meta device (shape
    checks) only the layout is made."""
    for key, row_key, exp_key in entries:
        scales = state.get(key)
        if not isinstance(scales, torch.Tensor) or scales.dtype == torch.uint8:
            continue
        names = (key, row_key) if row_key else (key,)
        if scales.device.type == "meta":
            state[exp_key] = torch.empty(scales.shape[:-dims], dtype=torch.int32, device="meta")
            for name in names:
                state[name] = torch.empty(state[name].shape, dtype=torch.uint8, device="meta")
            continue
        grid = [log_scales.grid_index(state[name].float()) for name in names]
        exponent = log_scales.matrix_exponent(grid[0], dims)
        if row_key:
            exponent = torch.maximum(exponent, log_scales.matrix_exponent(grid[1], dims=1))
        state[exp_key] = exponent
        for name, j in zip(names, grid):
            state[name] = log_scales.encode_scales(j, exponent)


def restore_state(value: Any, device: torch.device) -> Any:
    """A saved state value with its tensors on ``device`` and their saved dtypes, but block scales in bf16.

    The step counter stays a CPU fp32 tensor so reading it never waits for the accelerator (a plain
    number, torch's older format, becomes one). Block scales (``*_scales``) saved in fp32, before they were
    stored in bf16 (2026-12-01), are rounded to bf16: each decoded entry moves by at most 2^-8 of its block's
    largest one until its next re-encoding, and the state has the layout every later step writes.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: step_tensor(v) if k == "step" else _restore_entry(k, v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_state(v, device) for v in value]
    return value


def _restore_entry(key: str, value: Any, device: torch.device) -> Any:
    if key.endswith("_scales") and isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(device, SCALE_DTYPE)
    return restore_state(value, device)


def step_tensor(step: Any) -> torch.Tensor:
    """A saved step counter (tensor or number) as the CPU fp32 tensor the step increments."""
    if isinstance(step, torch.Tensor):
        return step.to("cpu", torch.float32)
    return torch.tensor(float(step))
