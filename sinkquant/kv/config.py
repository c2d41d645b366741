"""`KVCacheConfig`: what the sink-aware KV cache does, as one typed config.

The same class is a recipe's `kv_cache:` section, what a checkpoint's `quantization_config` stores
and what `SinkQuantizedCache` takes, so its rules are checked in one place. Calibration results (sink
positions found, key outlier channel indices) are not settings and stay outside it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import InputError
from ..schema import StrictModel, first_error


class KVCacheConfig(StrictModel):
    """bits: code width of the quantized body. key_granularity: "channel" (KIVI-style groups of
    `group_size` tokens per channel) or "token". sinks: "auto" (from a calibration report), "none", or
    leading positions kept exact. residual: most recent tokens kept at full precision. max_tokens:
    streaming, evict the oldest non-sink tokens beyond this. key_outlier_channels: key channels per KV
    head kept at full precision."""

    bits: Literal[2, 4, 8] = 4
    key_granularity: Literal["channel", "token"] = "channel"
    value_granularity: Literal["token"] = "token"
    group_size: int = Field(64, ge=8, le=1024)
    symmetric: bool = False
    sinks: Literal["auto", "none"] | list[int] = "auto"
    residual: int = Field(64, ge=0)
    max_tokens: int | None = Field(None, ge=16)
    key_outlier_channels: int = Field(0, ge=0, le=32)

    @field_validator("group_size")
    @classmethod
    def _whole_bytes(cls, value, info):
        bits = info.data.get("bits")
        if bits is not None and (value * bits) % 8:
            raise ValueError(
                f"group_size * bits must fill whole bytes (a multiple of 8) at {bits} bits; use e.g. 32 or 64"
            )
        return value

    @field_validator("sinks")
    @classmethod
    def _positions(cls, value):
        if isinstance(value, list):
            if any(p < 0 for p in value):
                raise ValueError("sink positions must be >= 0")
            return sorted(set(value))
        return value

    @model_validator(mode="after")
    def _window_fits(self) -> KVCacheConfig:
        # the cache needs room for the sinks, one quantized group and the residual window
        floor = len(self.leading_sinks) + self.group_size + self.residual
        if self.max_tokens is not None and self.max_tokens < floor:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be at least sinks + group_size + residual ({floor})"
            )
        return self

    @property
    def leading_sinks(self) -> list[int]:
        """The leading sink positions this config names ("auto" without a report means [0])."""
        return [] if self.sinks == "none" else [0] if self.sinks == "auto" else list(self.sinks)

    def describe(self) -> str:
        """One line for summaries and logs."""
        return (
            f"int{self.bits}, keys per {self.key_granularity}, group {self.group_size}, sinks {self.sinks}, "
            f"residual {self.residual}, key outlier channels {self.key_outlier_channels}, "
            f"max tokens {self.max_tokens}"
        )

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict) -> KVCacheConfig:
        """From stored or user-given settings, as one-line `InputError`s (constructing the class
        directly raises pydantic's `ValidationError`; a recipe reports its own file and line)."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise InputError(f"kv_cache {first_error(exc)}") from None
