"""The option machinery shared by every optimizer's options (Q4Shampoo's, Q4AdamW's, SparseMFAC's).

:class:`ConfigError`, :class:`OptionsBase` (construction helpers of the frozen option dataclasses), plain values
(numpy scalars as Python numbers, one-element tensor learning rates) and the ``--optim_args`` grammar
(``key=value,key=value``: :func:`parse_key_values`, :func:`parse_bool`). No optimizer's own options, no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "OptionsBase",
    "lr_number",
    "plain_value",
    "parse_bool",
    "parse_key_values",
]


class ConfigError(ValueError):
    """A Q4Shampoo option has an unknown name or an invalid value."""


class OptionsBase:
    """Construction helpers shared by the optimizers' frozen option dataclasses (Q4Shampoo, Q4AdamW, SparseMFAC):
    unknown names are refused with the allowed ones; ``OWNER`` names the optimizer in the messages."""

    OWNER = "Q4Shampoo"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def _check_names(cls, kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"{cls.OWNER}: unknown option(s) {', '.join(map(repr, unknown))}. "
                f"Allowed options: {', '.join(cls.field_names())}."
            )

    @classmethod
    def from_kwargs(cls: type[_Options], **kwargs: Any) -> _Options:
        """Build from keyword arguments, naming any unknown key and the allowed ones."""
        cls._check_names(kwargs)
        return cls(**kwargs)

    def replace(self: _Options, **kwargs: Any) -> _Options:
        """A copy with some fields changed (validated; unknown names are refused)."""
        self._check_names(kwargs)
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (safe for ``torch.load(weights_only=True)``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _normalise_and_validate(self, validate: Callable[[str, Any], None]) -> None:
        """Every field as a plain Python value (numpy scalars become numbers, ``betas`` a tuple), then checked by
        ``validate(name, value)``; for ``__post_init__`` of a frozen dataclass."""
        for f in fields(self):
            value = plain_value(getattr(self, f.name))
            if f.name == "betas" and isinstance(value, (list, tuple)):
                value = tuple(plain_value(b) for b in value)
            object.__setattr__(self, f.name, value)
            validate(f.name, value)


_Options = TypeVar("_Options", bound=OptionsBase)


def lr_number(lr: Any, owner: str = "Q4Shampoo") -> float:
    """The value of a tensor learning rate, which must hold exactly one number (``owner`` names the optimizer)."""
    if lr.numel() != 1:
        raise ConfigError(
            f"{owner}: lr must be a number or a one-element tensor, got a tensor of shape {tuple(lr.shape)}."
        )
    return float(lr)


def plain_value(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (torch accepts ``np.float32(1e-3)`` as a learning
    rate); anything else unchanged."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------
# the ``--optim_args`` grammar
# --------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(name: str, text: str, owner: str) -> bool:
    """An ``--optim_args`` boolean (true/false, 1/0, yes/no, y/n, on/off; any case); ``owner`` names the optimizer."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{owner}: optim_args value {name}={text!r} is not true or false.")


def parse_key_values(
    text: str | None,
    owner: str,
    names: tuple[str, ...],
    example: str,
    cast: Callable[[str, str], Any],
    validate: Callable[[str, Any], None],
    reserved: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``"key=value,key=value"`` as ``{key: cast(key, value)}``, each value checked by ``validate(key, value)``.

    The ``--optim_args`` grammar every optimizer of this package shares. Malformed items, keys not in
    ``names``, keys given twice and ``reserved`` keys (mapped to the flag they come from) raise
    :class:`ConfigError`, prefixed with ``owner`` and naming the allowed keys; ``example`` shows a valid item.
    """
    if text is None or not text.strip():
        return {}
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # key -> its text, to name both values of a repeated key
    allowed = ", ".join(n for n in names if not reserved or n not in reserved)
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"{owner}: optim_args item {item!r} is not of the form key=value (e.g. {example}). "
                f"Allowed keys: {allowed}."
            )
        key, value = item.split("=", 1)
        if reserved and key in reserved:
            raise ConfigError(f"{owner}: {key!r} cannot be set in optim_args; use {reserved[key]} instead.")
        if key not in names:
            raise ConfigError(f"{owner}: unknown optim_args key {key!r}. Allowed keys: {allowed}.")
        if key in given:
            raise ConfigError(
                f"{owner}: optim_args key {key!r} is given twice ({key}={given[key]} and {key}={value}); give it once."
            )
        given[key] = value
        out[key] = cast(key, value)
        try:
            validate(key, out[key])
        except ConfigError as err:
            raise ConfigError(f"{str(err).rstrip('.')} (from optim_args {key}={value}).") from None
    return out
