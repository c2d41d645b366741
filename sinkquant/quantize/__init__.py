"""Quantization: numeric primitives, quantized linear layers, weight quantization, KV cache."""
