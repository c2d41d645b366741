"""A transformers `Cache` that keeps attention-sink tokens and a recent window at full precision.

Per full-attention layer, `SinkQuantizedLayer` holds three stores, in token order:

* sinks: the leading positions (counted from each row's first real token) and content sinks found at
  run time by their massive activation, kept exactly in every layer;
* a quantized body: int8/int4/int2 codes really packed into bytes, keys per channel (groups of
  `group_size` tokens) or per token, values per token; sinks and padding are left out of the group
  statistics and put back exactly when the body is read;
* a full-precision tail: the most recent `residual` tokens or more, and always the chunk being attended.

Quantization is lazy. The detection hook runs after earlier layers already stored a chunk, so a token
moves into the body only at a later `update()`, once its flags are final. With `max_tokens`, whole
quantized groups of the oldest non-sink tokens are evicted (StreamingLLM: sinks + recent window).
Sliding-window layers (Gemma 3) use transformers' own full-precision layer.

Shapes: states are [batch, kv_heads, tokens, head_dim]; positions are absolute token indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from ..errors import InputError
from .config import KVCacheConfig
from .flags import TokenFlags
from .hooks import ModelHooks
from .layer import BatchMapping, SinkQuantizedLayer, tensor_bytes


@dataclass
class SinkDetection:
    """Run-time content-sink test: |h[..., dims]| > threshold at the output of decoder layer `layer`."""

    layer: int
    dims: list[int] = field(default_factory=list)
    threshold: float = 100.0

    @classmethod
    def from_report(cls, report) -> SinkDetection | None:
        """From a CalibrationReport's massive-activation signature (None when it found none)."""
        signature = report.massive_signature()
        return None if signature is None else cls(**signature)


class SinkQuantizedCache(BatchMapping, Cache):
    """Sink-aware quantized KV cache for a decoder-only model (see the module docstring).

    Build it with `SinkQuantizedCache.for_model(model, ...)` or `build_cache(model, config, report)`,
    which attach it to the model's hooks (padding mask, run-time sink detection; see `hooks.py`).
    Several caches may be attached to one model at once; `detach()` takes one out.
    """

    def __init__(
        self,
        model_config,
        config: KVCacheConfig | None = None,
        detect: SinkDetection | None = None,
        key_outlier_idx: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.config = config or KVCacheConfig()
        self.detect = detect
        self.flags = TokenFlags(self.config.leading_sinks, detecting=detect is not None)
        text = model_config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        check_has_full_attention(layer_types)
        key_outlier_idx = dict(key_outlier_idx or {})
        layers = []
        for idx, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if kind == "full_attention":
                layers.append(SinkQuantizedLayer(self.config, self.flags, key_outlier_idx.pop(idx, None)))
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kwargs))
            else:
                raise InputError(
                    f"layer {idx} is a {kind!r} layer; SinkQuantizedCache supports full, sliding and chunked "
                    "attention only: use transformers' DynamicCache for this model"
                )
        if key_outlier_idx:
            raise InputError(
                f"key outlier channels given for layers {sorted(key_outlier_idx)}, which are not full-attention layers "
                f"of this {len(layers)}-layer model"
            )
        if detect is not None:
            hidden = getattr(text, "hidden_size", None)
            if not 0 <= detect.layer < len(layers) or (
                hidden and any(not 0 <= d < hidden for d in detect.dims)
            ):
                raise InputError(
                    f"sink detection at layer {detect.layer}, dims {detect.dims} does not fit this model "
                    f"({len(layers)} layers, hidden size {hidden}); recalibrate on this model"
                )
        self._hooks: ModelHooks | None = None
        super().__init__(layers=layers)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        bits: int = 4,
        *,
        key_granularity: str = "channel",
        group_size: int = 64,
        symmetric: bool = False,
        sinks: list[int] | str = (0,),
        detect: SinkDetection | None = None,
        residual: int = 64,
        max_tokens: int | None = None,
        key_outlier_idx: dict[int, torch.Tensor] | None = None,
    ) -> SinkQuantizedCache:
        """A cache for `model`, attached to it (hooks for the padding mask and sink detection)."""
        sinks = list(sinks) if isinstance(sinks, (list, tuple)) else sinks
        config = KVCacheConfig.from_dict(
            {
                "bits": bits,
                "key_granularity": key_granularity,
                "group_size": group_size,
                "symmetric": symmetric,
                "sinks": sinks,
                "residual": residual,
                "max_tokens": max_tokens,
                "key_outlier_channels": _outlier_count(key_outlier_idx),
            }
        )
        return cls(model.config, config, detect, key_outlier_idx).attach(model)

    # -- hooks --------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> SinkQuantizedCache:
        """Let `model`'s forwards that are given this cache feed it their padding mask (and, with
        detection, the hidden state it watches). Other caches attached to the model keep theirs."""
        self.detach()
        hooks = ModelHooks.of(model)
        hooks.add(self)
        self._hooks = hooks
        return self

    def detach(self) -> None:
        """Stop taking part in the model's hooks (the cache keeps working, without detection)."""
        if self._hooks is not None:
            self._hooks.discard(self)
            self._hooks = None

    def begin_chunk(self, batch: int, n: int, attention_mask: torch.Tensor | None, device) -> None:
        """Register the next n tokens (called by the model pre-hook; `attention_mask` [B, past + n])."""
        real = attention_mask[:, -n:] if attention_mask is not None and attention_mask.dim() == 2 else None
        self.flags.crop(self.get_seq_length())
        if self.config.max_tokens is not None and real is not None and not bool(real.bool().all()):
            raise InputError(
                "streaming eviction (max_tokens) does not support padded batches: run one sequence per batch "
                "or set max_tokens to None"
            )
        self.flags.begin(batch, n, real, device)

    # -- Cache API ----------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.flags.crop(0)
        self.flags.real = None

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:  # check every layer first, so a refused crop changes nothing
            if isinstance(layer, SinkQuantizedLayer):
                layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)
        self.flags.crop(self.get_seq_length())

    def map_batch(self, fn) -> None:
        for layer in self.layers:
            if isinstance(layer, SinkQuantizedLayer):
                layer.map_batch(fn)
            elif layer.is_initialized:  # transformers' sliding-window layer: keys and values only
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        self.flags.map_batch(fn)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes actually held, by part: sinks_fp, residual_fp, codes, scales (and minimums),
        key_outlier_idx, sliding (full-precision sliding-window layers), and their total."""
        parts = dict.fromkeys(
            ["sinks_fp", "residual_fp", "codes", "scales", "key_outlier_channels", "sliding"], 0
        )
        for layer in self.layers:
            if isinstance(layer, SinkQuantizedLayer):
                for key, value in layer.memory_bytes().items():
                    parts[key] += value
            elif layer.is_initialized:
                parts["sliding"] += tensor_bytes(layer.keys, layer.values)
        parts["total"] = sum(parts.values())
        return parts


def check_has_full_attention(layer_types: list[str]) -> None:
    if "full_attention" not in layer_types:
        raise InputError(
            f"every one of this model's {len(layer_types)} layers is a {'/'.join(sorted(set(layer_types)))} layer, whose "
            "short window the KV cache keeps at full precision: a quantized KV cache would change nothing; drop "
            "--kv-bits (the kv_cache section)"
        )


def _outlier_count(key_outlier_idx: dict[int, torch.Tensor] | None) -> int:
    return max((int(t.shape[-1]) for t in (key_outlier_idx or {}).values()), default=0)


def build_cache(
    model: nn.Module,
    config: KVCacheConfig,
    report=None,
    key_outlier_idx: dict[int, torch.Tensor] | None = None,
) -> SinkQuantizedCache:
    """The cache a config asks for, attached to `model`.

    sinks="auto": the leading positions of the calibration `report` plus run-time detection of its
    massive-activation signature ([0] and no detection without a report). key_outlier_channels > 0 needs
    `key_outlier_idx` {layer: LongTensor [kv_heads, >= n]} (see `sinkquant.calibrate.keys`).
    """
    detect = None
    if config.sinks == "auto" and report is not None:
        config = config.model_copy(update={"sinks": list(report.sinks.positions)})
        detect = SinkDetection.from_report(report)
    n = config.key_outlier_channels
    if n and not key_outlier_idx:
        raise InputError(
            f"kv_cache key_outlier_channels={n} needs calibrated key channels: pass key_outlier_idx="
            "top_key_channels(key_channel_stats(model, ids), n), or set key_outlier_channels to 0"
        )
    outliers = {layer: idx[..., :n] for layer, idx in (key_outlier_idx or {}).items()} if n else None
    return SinkQuantizedCache(model.config, config, detect, outliers).attach(model)
