"""Pre-flight estimate of optimizer-state memory: :func:`estimate_memory` and ``q4shampoo memory``.

Nothing is allocated. A model given by name or config is built on the ``meta`` device (only its
config is read), and every Q4Shampoo number is the optimizer's own ``build_state`` on meta parameters,
measured by :func:`hf_q4shampoo.memory.optimizer_state_bytes`' per-parameter code: the code that
measures a real run, so estimate and measurement agree by construction. The state of a parameter
depends only on its shape and dtype, so one meta representative per (shape, dtype) is built and its
bytes are multiplied by the count: a 7B Llama has a handful of distinct shapes, and is estimated in
seconds.

Which parameters count: the trainable ones (``requires_grad``), each once (tied weights are one
parameter), as Trainer hands them to the optimizer. A peft model therefore gives the adapter's numbers.

Rows: ``adamw``, ``adamw_8bit_bnb``, ``adamw_4bit_torchao`` (formulas of those libraries' state layouts, each
with its source: :mod:`hf_q4shampoo.peers`), ``fp32_shampoo`` (``8 n + 8 sum(k^2)`` per tensor: fp32 Adam ``m``,
``v`` plus an fp32 statistic and root per Kronecker factor of order ``k`` in Q4Shampoo's block plan, as
:func:`hf_q4shampoo.memory.fp32_shampoo_equivalent` defines it), ``q4shampoo_<precond>`` (exact:
``Q4Shampoo(..., precond=<precond>).build_state()`` on meta tensors) and ``q4adamw_<variant>`` (exact:
``Q4AdamW(..., variant=<variant>).build_state()``, the other Q4AdamW options at their defaults).

The dtype of the trainable parameters (``dtype=``, default float32, the master weights of mixed
precision training) only changes the rows whose state follows it: AdamW, and the tensors that the
quantized AdamWs leave unquantized. Q4Shampoo's state is fp32 or 4 bit whatever the parameter dtype.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocking import local_tensor
from .config import PRECOND_FORMS, Q4ShampooConfig
from .memory import (
    KINDS,
    MemoryReport,
    ReportBuilder,
    adamw_equivalent,
    config_block_plan,
    format_bytes,
    fp32_shampoo_equivalent,
    param_state_bytes,
    unwrap_optimizer,
)
from .optimizer import Q4Shampoo
from .peers import HOW, TRAINER_TORCHAO_BLOCK, ShapeKey, adamw_bytes, bnb_8bit_bytes, torchao_4bit_bytes
from .q4adamw import Q4AdamW
from .q4adamw_config import VARIANTS as Q4ADAMW_VARIANTS
from .sparse_mfac import SparseMFAC

__all__ = [
    "EstimateRow",
    "MemoryEstimate",
    "EstimateUnavailable",
    "estimate_memory",
    "estimate_optimizer_state",
    "shampoo_equivalents",
    "build_meta_model",
    "trainable_parameters",
]


class EstimateUnavailable(RuntimeError):
    """The state of this optimizer cannot be sized without running it on real tensors."""


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstimateRow:
    """Estimated optimizer state of one optimizer for one model."""

    name: str  # machine key, e.g. "adamw", "q4shampoo_cholesky_ef"
    label: str  # what a person reads
    total_bytes: int
    bytes_per_param: float
    how: str  # formula and source, or "exact"
    by_kind: dict[str, int] | None = None  # Q4Shampoo and Q4AdamW rows only
    selected: bool = False  # the Q4Shampoo form the given options select

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "total_bytes": self.total_bytes,
            "bytes_per_param": self.bytes_per_param,
            "by_kind": self.by_kind,
            "selected": self.selected,
            "how": self.how,
        }


@dataclass
class MemoryEstimate:
    """Optimizer-state bytes of several optimizers for one model (see the module docstring)."""

    model: str
    num_params: int
    num_trainable: int
    param_dtype: str
    options: dict[str, Any]
    rows: list[EstimateRow]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> EstimateRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no estimate row {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    @property
    def selected(self) -> EstimateRow:
        """The Q4Shampoo row of the options given."""
        return next(r for r in self.rows if r.selected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "num_params": self.num_params,
            "num_trainable": self.num_trainable,
            "param_dtype": self.param_dtype,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()},
            "rows": [r.to_dict() for r in self.rows],
            "seconds": self.seconds,
            "notes": self.notes,
        }

    def to_markdown(self, by_kind: bool = True) -> str:
        """The table ``q4shampoo memory`` prints (markdown, readable as plain text)."""
        adamw = self.row("adamw").total_bytes
        lines = [
            "| optimizer | state | bytes / param | vs AdamW |",
            "|---|---:|---:|---:|",
        ]
        for r in self.rows:
            label = f"**{r.label}**" if r.selected else r.label
            ratio = r.total_bytes / adamw if adamw else float("nan")
            lines.append(f"| {label} | {format_bytes(r.total_bytes)} | {r.bytes_per_param:.2f} | {ratio:.2f}x |")
        if by_kind:
            shampoo = [r for r in self.rows if r.by_kind is not None]
            lines += ["", "Q4Shampoo / Q4AdamW state by kind:", ""]
            kinds = [k for k in KINDS if any(r.by_kind.get(k, 0) for r in shampoo)] or list(KINDS[:1])
            lines.append("| precond / variant | " + " | ".join(kinds) + " |")
            lines.append("|---|" + "---:|" * len(kinds))
            for r in shampoo:
                cells = " | ".join(format_bytes(r.by_kind[k]) for k in kinds)
                lines.append(f"| {r.name.removeprefix('q4shampoo_')} | {cells} |")  # q4adamw_<variant> as it is
        return "\n".join(lines)

    def how_text(self) -> str:
        """One line per row: how its number was obtained."""
        return "\n".join(f"- {r.label}: {r.how}" for r in self.rows)


# ----------------------------------------------------------------------------------------------
# parameters and models
# ----------------------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters an optimizer would get: ``requires_grad``, each once (tied weights once)."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _embedding_weight_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _load_config(name_or_path: str | os.PathLike) -> Any:
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is a folder without a config.json.")
    try:
        return AutoConfig.from_pretrained(str(name_or_path))
    except Exception as e:  # transformers raises OSError/ValueError/HF errors depending on the cause
        if path.exists():
            raise ValueError(f"could not read a transformers config from {str(path)!r}: {e}") from e
        raise ValueError(
            f"could not load the config of {str(name_or_path)!r}: it is not a local folder or config.json "
            f"file, and the Hub lookup failed ({type(e).__name__}: {e}). Offline, pass a folder that holds "
            "config.json or the path of a config.json."
        ) from e


def _model_class(config: Any, model_class: str | type | None) -> Any:
    import transformers

    if model_class is not None and not isinstance(model_class, str):
        return model_class
    if model_class:
        cls = getattr(transformers, model_class, None)
        if cls is None:
            raise ValueError(f"transformers has no class {model_class!r} (e.g. AutoModelForCausalLM).")
        return cls
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return None


def build_meta_model(
    model_or_config: Any, *, model_class: str | type | None = None, dtype: torch.dtype | str | None = None
) -> tuple[nn.Module, str]:
    """A model on the ``meta`` device and a description of where it came from.

    ``model_or_config``: an ``nn.Module`` (returned as is), a transformers config, a ``dict`` of config
    fields (with ``model_type``), a folder holding ``config.json``, a ``config.json`` path or a Hub name.
    The class is ``model_class`` if given (a transformers class or its name), else the config's first
    ``architectures`` entry, else ``AutoModelForCausalLM``, else ``AutoModel``. Parameters built from a
    config are ``dtype`` (default float32, whatever dtype the config names).
    """
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
        if dtype is not None:
            raise ValueError("dtype= applies to models built from a config; cast the module yourself.")
        return model, type(model).__name__
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    source = "config"
    config = model_or_config
    if isinstance(config, dict):
        fields = dict(config)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    elif isinstance(config, (str, os.PathLike)):
        source = str(config)
        config = _load_config(config)
    cls = _model_class(config, model_class)
    with torch.device("meta"):
        if cls is not None:
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
        else:
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:  # no causal-LM head for this architecture
                model = AutoModel.from_config(config)
    # A checkpoint's config often names bf16/fp16 (its storage dtype); training keeps fp32 master weights
    # unless told otherwise, and torch's AdamW state follows the parameter dtype, so default to fp32.
    model = model.to(_dtype(dtype) if dtype is not None else torch.float32)
    return model, f"{type(model).__name__} from {source}"


def _dtype(d: torch.dtype | str) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    out = getattr(torch, str(d), None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {d!r} (e.g. float32, bfloat16, float16).")
    return out


# ----------------------------------------------------------------------------------------------
# shape census and per-shape state
# ----------------------------------------------------------------------------------------------


def _census(params: Iterable[torch.Tensor]) -> Counter[ShapeKey]:
    return Counter((tuple(local_tensor(p).shape), p.dtype) for p in params)


def _meta_param(key: ShapeKey) -> nn.Parameter:
    shape, dtype = key
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))


def _per_shape_state(
    groups: Sequence[tuple[dict[str, Any], Counter[ShapeKey]]],
    make: Callable[[list[dict[str, Any]]], Any],
    needs_step: bool,
) -> list[dict[ShapeKey, dict[str, int]]]:
    """Build an optimizer over one meta representative per (group, shape) and measure each one's state."""
    reps = [{key: _meta_param(key) for key in census} for _, census in groups]
    param_groups = [{**hp, "params": list(r.values())} for (hp, _), r in zip(groups, reps)]
    with warnings.catch_warnings():  # the real optimizer has said what it had to (e.g. "no root in this run")
        warnings.simplefilter("ignore")
        opt = make(param_groups)
    if needs_step:
        for r in reps:
            for p in r.values():
                p.grad = torch.empty_like(p)
        opt.step()
    else:
        opt.build_state()
    return [{key: param_state_bytes(opt, p) for key, p in r.items()} for r in reps]


def _report_from_shapes(
    groups: Sequence[tuple[dict[str, Any], Counter[ShapeKey]]],
    per_shape: list[dict[ShapeKey, dict[str, int]]],
    config: Q4ShampooConfig,
) -> MemoryReport:
    """The report of the measured representatives, each counted as often as its shape occurs."""
    builder = ReportBuilder(config_block_plan(config))
    for (_, census), sizes in zip(groups, per_shape):
        builder.group()
        for key, count in census.items():
            builder.add(key[0], sizes[key], count)
    return builder.report(largest=0)


def shampoo_equivalents(params: Iterable[torch.Tensor], config: Q4ShampooConfig | None = None) -> tuple[int, int]:
    """``(adamw, fp32_shampoo)`` equivalent bytes for ``params``, as :mod:`hf_q4shampoo.memory` defines them.

    ``fp32_shampoo`` uses the block plan of ``config`` (default :class:`Q4ShampooConfig`), so an AdamW
    run can be compared with the Shampoo a Q4Shampoo run would have stored.
    """
    plan = config_block_plan(config)
    census = _census(params)
    adamw = sum(adamw_equivalent(shape) * count for (shape, _), count in census.items())
    fp32 = sum(fp32_shampoo_equivalent(shape, plan) * count for (shape, _), count in census.items())
    return adamw, fp32


def _group_hparams(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


#: torch's kernel choices: they decide how a step runs, not what state it keeps, and fused kernels refuse
#: meta tensors, so the meta dry-run takes the plain for-loop path.
_KERNEL_CHOICES = {"fused": False, "foreach": False}


def _ctor_kwargs(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's ``defaults`` that its constructor accepts (torch keeps extra keys there)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = dict(defaults)
    else:
        kwargs = {k: v for k, v in defaults.items() if k in params}
    kwargs.update({k: v for k, v in _KERNEL_CHOICES.items() if k in kwargs})
    return kwargs


def estimate_optimizer_state(optimizer: Any) -> MemoryReport:
    """Size the state ``optimizer`` will hold once every parameter has stepped, without allocating it.

    Q4Shampoo: its ``build_state`` on meta copies of its parameter groups (same config). Any other
    optimizer: a new instance of its class (same defaults and group options) takes one step on meta
    copies; optimizers whose step cannot run on meta tensors (custom kernels, ``.item()`` on state)
    raise :class:`EstimateUnavailable`. ``fp32_shampoo_equivalent`` uses Q4Shampoo's block plan (its own
    config, or the default one for other optimizers).
    """
    opt = unwrap_optimizer(optimizer)
    if isinstance(opt, SparseMFAC):  # its state is per flattened group, not per parameter shape
        raise EstimateUnavailable(
            "no pre-flight estimate for SparseMFAC: its state is one window per parameter group "
            "(the measured report counts it)."
        )
    groups = [(_group_hparams(g), _census(g["params"])) for g in opt.param_groups]
    if isinstance(opt, Q4Shampoo):
        config = opt.config
        per_shape = _per_shape_state(groups, lambda pg: Q4Shampoo(pg, config=config), needs_step=False)
        return _report_from_shapes(groups, per_shape, config)
    if isinstance(opt, Q4AdamW):
        per_shape = _per_shape_state(groups, lambda pg: Q4AdamW(pg, config=opt.config), needs_step=False)
        return _report_from_shapes(groups, per_shape, Q4ShampooConfig())
    cls = type(opt)
    kwargs = _ctor_kwargs(cls, opt.defaults)
    groups = [({**hp, **{k: v for k, v in _KERNEL_CHOICES.items() if k in hp}}, census) for hp, census in groups]
    try:
        per_shape = _per_shape_state(groups, lambda pg: cls(pg, **kwargs), needs_step=True)
    except Exception as e:  # any failure of a foreign optimizer on meta tensors means "cannot estimate"
        raise EstimateUnavailable(
            f"cannot size the state of {cls.__name__} on the meta device ({type(e).__name__}: {e})."
        ) from e
    return _report_from_shapes(groups, per_shape, Q4ShampooConfig())


# ----------------------------------------------------------------------------------------------
# estimate_memory
# ----------------------------------------------------------------------------------------------


_HOW = {
    **HOW,
    "fp32_shampoo": "8·n + 8·Σk² (fp32 Adam m, v + fp32 statistic and root per factor of order k, same blocks)",
    "q4shampoo": "exact: Q4Shampoo(precond={form}).build_state() on meta tensors",
    "q4adamw": "exact: Q4AdamW(variant={variant}).build_state() on meta tensors",
}


def estimate_memory(
    model_or_config: Any,
    *,
    dtype: torch.dtype | str | None = None,
    model_class: str | type | None = None,
    bnb_embeddings_32bit: bool = True,
    torchao_block_size: int = TRAINER_TORCHAO_BLOCK,
    **optimizer_kwargs: Any,
) -> MemoryEstimate:
    """Optimizer-state bytes of AdamW, its 8-bit and 4-bit peers, fp32 Shampoo and every Q4Shampoo form.

    Args:
        model_or_config: an ``nn.Module`` (real or meta; a peft model counts its adapters), a transformers
            config or ``dict``, a folder holding ``config.json``, a ``config.json`` path, or a Hub name
            (needs the Hub). Only the trainable parameters' shapes are used; nothing is allocated.
        dtype: dtype of the trainable parameters when the model is built from a config (default float32).
        model_class: transformers class (or its name) to build from a config; see :func:`build_meta_model`.
        bnb_embeddings_32bit: the 8-bit row keeps ``nn.Embedding`` weights in 32 bit, as HF Trainer does.
        torchao_block_size: block of the torchao 4-bit row (HF Trainer's default 256; torchao's own 128).
        **optimizer_kwargs: :class:`~hf_q4shampoo.Q4ShampooConfig` fields (``precond`` selects the
            highlighted row; the others apply to every Q4Shampoo row and to the fp32-Shampoo block plan).

    Returns:
        A :class:`MemoryEstimate`; ``estimate.row("adamw")``, ``estimate.selected``, ``to_markdown()``.
    """
    start = time.perf_counter()
    config = Q4ShampooConfig.from_kwargs(**optimizer_kwargs)
    model, description = build_meta_model(model_or_config, model_class=model_class, dtype=dtype)
    params = trainable_parameters(model)
    if not params:
        raise ValueError(f"{description} has no trainable parameters (requires_grad=True).")
    census = _census(params)
    embedding_ids = _embedding_weight_ids(model)
    embeddings = _census(p for p in params if id(p) in embedding_ids)
    n_trainable = sum(math.prod(s) * c for (s, _), c in census.items())
    n_total = sum(local_tensor(p).numel() for p in {id(p): p for p in model.parameters()}.values())

    rows: list[EstimateRow] = []

    def add(name: str, label: str, total: int, how: str, **extra: Any) -> None:
        rows.append(EstimateRow(name, label, total, total / n_trainable, how, **extra))

    add("adamw", "AdamW (torch)", adamw_bytes(census), _HOW["adamw"])
    emb_note = "nn.Embedding weights 32-bit, as HF Trainer sets up" if bnb_embeddings_32bit else "no 32-bit overrides"
    add(
        "adamw_8bit_bnb",
        "8-bit AdamW (bitsandbytes)",
        bnb_8bit_bytes(census, embeddings, bnb_embeddings_32bit),
        _HOW["adamw_8bit_bnb"].format(emb=emb_note),
    )
    add(
        "adamw_4bit_torchao",
        "4-bit AdamW (torchao)",
        torchao_4bit_bytes(census, torchao_block_size),
        _HOW["adamw_4bit_torchao"].format(block=torchao_block_size),
    )
    groups = [({}, census)]
    plan = config_block_plan(config)
    fp32_shampoo = sum(fp32_shampoo_equivalent(shape, plan) * count for (shape, _), count in census.items())
    add("fp32_shampoo", "fp32 Shampoo (same blocks)", fp32_shampoo, _HOW["fp32_shampoo"])
    for form in PRECOND_FORMS:
        form_config = config.replace(precond=form)
        per_shape = _per_shape_state(groups, lambda pg, c=form_config: Q4Shampoo(pg, config=c), needs_step=False)
        report = _report_from_shapes(groups, per_shape, form_config)
        add(
            f"q4shampoo_{form}",
            f"Q4Shampoo {form}",
            report.total,
            _HOW["q4shampoo"].format(form=form),
            by_kind=dict(report.by_kind),
            selected=form == config.precond,
        )
    for variant in Q4ADAMW_VARIANTS:
        per_shape = _per_shape_state(groups, lambda pg, v=variant: Q4AdamW(pg, variant=v), needs_step=False)
        report = _report_from_shapes(groups, per_shape, config)
        add(
            f"q4adamw_{variant}",
            f"Q4AdamW {variant} (paper 3)",
            report.total,
            _HOW["q4adamw"].format(variant=variant),
            by_kind=dict(report.by_kind),
        )
    notes = []
    if n_trainable < n_total:
        notes.append(f"{n_total - n_trainable:,} frozen parameters (requires_grad=False) have no optimizer state.")
    return MemoryEstimate(
        model=description,
        num_params=n_total,
        num_trainable=n_trainable,
        param_dtype=", ".join(sorted({str(d).removeprefix("torch.") for _, d in census})),
        options=dict(optimizer_kwargs),
        rows=rows,
        seconds=time.perf_counter() - start,
        notes=notes,
    )
