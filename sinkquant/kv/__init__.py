"""The sink-aware quantized KV cache: one typed config, the per-layer store, the cache, its wiring."""

from .cache import SinkDetection, SinkQuantizedCache, build_cache
from .config import KVCacheConfig
from .layer import SinkQuantizedLayer
from .wiring import KVCalibration, cache_factory, calibrate_kv, install_default_cache

__all__ = [
    "KVCacheConfig",
    "KVCalibration",
    "SinkDetection",
    "SinkQuantizedCache",
    "SinkQuantizedLayer",
    "build_cache",
    "cache_factory",
    "calibrate_kv",
    "install_default_cache",
]
