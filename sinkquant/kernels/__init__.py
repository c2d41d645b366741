"""sinkquant's compiled CPU kernels: the fused int4 / int8 matrix-vector product of a quantized layer
and the KV cache's dequantization (`cpu.py`), built from sinkquant/csrc on first use (`build.py`).

`fused_kernels()` is the extension module, or None where it cannot run (then PyTorch's kernels are
used); `bind_layer` binds one layer's numbers into it; `int4_layout` / `int8_layout` are the layouts it
reads; `best_isa()` is the build this CPU gets.
"""

from .cpu import best_isa, bind_layer, fused_kernels, int4_layout, int8_layout

__all__ = ["best_isa", "bind_layer", "fused_kernels", "int4_layout", "int8_layout"]
