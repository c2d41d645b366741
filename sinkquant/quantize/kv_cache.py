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

import weakref
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from ..errors import InputError
from ..modeling import decoder_layers, hidden_of
from .kv_store import SinkQuantizedLayer, TokenFlags

_HOOKS_ATTR = "_sinkquant_kv_hooks"


@dataclass
class KVCacheConfig:
    """What the KV cache does (plain data; calibration results such as outlier channels stay outside)."""

    bits: int = 4
    key_granularity: str = "channel"  # "channel": KIVI-style groups of group_size tokens; "token"
    value_granularity: str = "token"
    group_size: int = 64
    symmetric: bool = False
    sinks: str | list[int] = "auto"  # "auto" (from a calibration report), "none", or leading positions
    residual: int = 64  # most recent tokens kept at full precision
    max_tokens: int | None = None  # streaming: evict the oldest non-sink tokens beyond this
    key_outlier_channels: int = 0  # key channels per KV head kept at full precision

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise InputError(f"kv_cache bits must be 2, 4 or 8 (got {self.bits!r})")
        if self.key_granularity not in ("channel", "token"):
            raise InputError(
                f"kv_cache key_granularity must be 'channel' or 'token' (got {self.key_granularity!r})"
            )
        if self.value_granularity != "token":
            raise InputError(f"kv_cache value_granularity must be 'token' (got {self.value_granularity!r})")
        if not isinstance(self.group_size, int) or self.group_size < 1 or (self.group_size * self.bits) % 8:
            raise InputError(
                f"kv_cache group_size must be a positive whole number of bytes of codes "
                f"(group_size * bits divisible by 8; got {self.group_size!r} at {self.bits} bits): use e.g. 32 or 64"
            )
        if isinstance(self.sinks, (list, tuple)):
            if any(not isinstance(p, int) or p < 0 for p in self.sinks):
                raise InputError(f"kv_cache sinks must be non-negative positions (got {self.sinks!r})")
            self.sinks = sorted(set(self.sinks))
        elif self.sinks not in ("auto", "none"):
            raise InputError(
                f"kv_cache sinks must be 'auto', 'none' or a list of positions (got {self.sinks!r})"
            )
        if not isinstance(self.residual, int) or self.residual < 0:
            raise InputError(
                f"kv_cache residual must be a non-negative number of tokens (got {self.residual!r})"
            )
        if self.key_outlier_channels < 0:
            raise InputError(
                f"kv_cache key_outlier_channels must be >= 0 (got {self.key_outlier_channels!r})"
            )
        if self.max_tokens is not None:
            floor = self.residual + self.group_size + len(self.leading_sinks)
            if self.max_tokens < floor:
                raise InputError(
                    f"kv_cache max_tokens={self.max_tokens} leaves no room for the sinks, one quantized group and "
                    f"the residual window: use max_tokens >= residual + group_size + sinks = {floor}"
                )

    @property
    def leading_sinks(self) -> list[int]:
        """The leading sink positions this config names ("auto" without a report means [0])."""
        return [] if self.sinks == "none" else [0] if self.sinks == "auto" else list(self.sinks)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KVCacheConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"unknown kv_cache field(s) {unknown}; allowed: {[f.name for f in fields(cls)]}")
        return cls(**data)


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


class SinkQuantizedCache(Cache):
    """Sink-aware quantized KV cache for a decoder-only model (see the module docstring).

    Build it with `SinkQuantizedCache.for_model(model, ...)` or `build_cache(model, config, report)`,
    which attach the hooks it needs (padding mask, run-time sink detection) to the model; a new cache
    attached to the same model replaces them, and `detach()` removes them.
    """

    def __init__(
        self,
        model_config,
        config: KVCacheConfig | None = None,
        detect: SinkDetection | None = None,
        key_outliers: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.config = config or KVCacheConfig()
        self.detect = detect
        self.flags = TokenFlags(self.config.leading_sinks, detecting=detect is not None)
        text = model_config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        key_outliers = dict(key_outliers or {})
        layers = []
        for idx, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if kind == "full_attention":
                layers.append(SinkQuantizedLayer(self.config, self.flags, key_outliers.pop(idx, None)))
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kwargs))
            else:
                raise InputError(
                    f"layer {idx} is a {kind!r} layer; SinkQuantizedCache supports full, sliding and chunked "
                    "attention only: use transformers' DynamicCache for this model"
                )
        if key_outliers:
            raise InputError(
                f"key outlier channels given for layers {sorted(key_outliers)}, which are not full-attention layers "
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
        self._hooks: list = []
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
        key_outliers: dict[int, torch.Tensor] | None = None,
    ) -> SinkQuantizedCache:
        """A cache for `model`, attached to it (hooks for the padding mask and sink detection)."""
        sinks = list(sinks) if isinstance(sinks, (list, tuple)) else sinks
        config = KVCacheConfig(
            bits=bits,
            key_granularity=key_granularity,
            group_size=group_size,
            symmetric=symmetric,
            sinks=sinks,
            residual=residual,
            max_tokens=max_tokens,
            key_outlier_channels=_outlier_count(key_outliers),
        )
        return cls(model.config, config, detect, key_outliers).attach(model)

    # -- hooks --------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> SinkQuantizedCache:
        """Register this cache's hooks on `model`, removing those of any cache attached before."""
        for handle in getattr(model, _HOOKS_ATTR, ()):
            handle.remove()
        ref = weakref.ref(self)
        self._hooks = [
            model.register_forward_pre_hook(partial(_on_model_start, ref), with_kwargs=True),
            model.register_forward_hook(partial(_on_model_end, ref), always_call=True),
        ]
        if self.detect is not None:
            layer = decoder_layers(model)[self.detect.layer]
            self._hooks.append(layer.register_forward_hook(partial(_on_detect_layer, ref)))
        setattr(model, _HOOKS_ATTR, list(self._hooks))
        return self

    def detach(self) -> None:
        """Remove this cache's hooks from the model (the cache keeps working, without detection)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

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

    def _map_batch(self, name: str, arg) -> None:
        for layer in self.layers:
            getattr(layer, name)(arg)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch("reorder_cache", beam_idx)
        self.flags.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch("batch_repeat_interleave", repeats)
        self.flags.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch("batch_select_indices", indices)
        self.flags.map_batch(lambda t: t[indices])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes actually held, by part: sinks_fp, residual_fp, codes, scales (and minimums),
        key_outliers, sliding (full-precision sliding-window layers), and their total."""
        parts = dict.fromkeys(["sinks_fp", "residual_fp", "codes", "scales", "key_outliers", "sliding"], 0)
        for layer in self.layers:
            if isinstance(layer, SinkQuantizedLayer):
                for key, value in layer.memory_bytes().items():
                    parts[key] += value
            elif layer.is_initialized:
                parts["sliding"] += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        parts["total"] = sum(parts.values())
        return parts


def _outlier_count(key_outliers: dict[int, torch.Tensor] | None) -> int:
    return max((int(t.shape[-1]) for t in (key_outliers or {}).values()), default=0)


def _on_model_start(ref, _module, args, kwargs):
    cache = ref()
    if cache is None or kwargs.get("past_key_values") is not cache:
        return None
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is not None:
        cache.begin_chunk(x.shape[0], x.shape[1], kwargs.get("attention_mask"), x.device)
    return None


def _on_model_end(ref, _module, _args, _output):
    cache = ref()
    if cache is not None:
        cache.flags.close()


def _on_detect_layer(ref, _module, _args, output):
    cache = ref()
    if cache is None or cache.flags.open is None:
        return
    h = hidden_of(output)
    dims = torch.tensor(cache.detect.dims, device=h.device, dtype=torch.long)
    cache.flags.detected((h.index_select(-1, dims).abs() > cache.detect.threshold).any(dim=-1))


def build_cache(
    model: nn.Module,
    config: KVCacheConfig,
    report=None,
    key_outliers: dict[int, torch.Tensor] | None = None,
) -> SinkQuantizedCache:
    """The cache a config asks for, attached to `model`.

    sinks="auto": the leading positions of the calibration `report` plus run-time detection of its
    massive-activation signature ([0] and no detection without a report). key_outlier_channels > 0 needs
    `key_outliers` {layer: LongTensor [kv_heads, >= n]} (see `sinkquant.calibrate.keys`).
    """
    detect = None
    if config.sinks == "auto" and report is not None:
        config = replace(config, sinks=list(report.sinks.positions))
        detect = SinkDetection.from_report(report)
    n = config.key_outlier_channels
    if n and not key_outliers:
        raise InputError(
            f"kv_cache key_outlier_channels={n} needs calibrated key channels: pass key_outliers="
            "top_key_channels(key_channel_stats(model, ids), n), or set key_outlier_channels to 0"
        )
    outliers = {layer: idx[..., :n] for layer, idx in (key_outliers or {}).items()} if n else None
    return SinkQuantizedCache(model.config, config, detect, outliers).attach(model)
