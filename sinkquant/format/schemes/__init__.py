"""Weight schemes: how a `SinkQuantLinear` computes with its kept columns as integers, one registry
entry each.

A scheme is stateless. It supplies the quantization (round-to-nearest, or integers chosen elsewhere,
e.g. by GPTQ), what its buffers hold (`buffers`, `read`; their names, shapes and dtypes are the layer
format's, `sinkquant.format.LayerSpec`), the dequantization, and what PyTorch's integer CPU kernel and
sinkquant's fused kernel need. The layer owns the buffers, the outlier columns and the bias, and picks
the forward path.

Registered schemes:

* `Int8PerChannel` (bits 8): symmetric int8, one scale per output channel.
* `Int4Grouped` (bits 4): min/max in groups of `group_size` consecutive kept columns (the last may be
  shorter), codes packed two to a byte, low nibble first. A symmetric layer's minimum is always
  -8 * scale (exact in bf16), so it stores none. A layer with log scales stores each scale as one byte on
  a grid of 1/32 octave below one exponent per layer (`primitives.encode_log_scales`); everything past
  storage sees the decoded bf16 scales (`read`), so the kernels, the dequantization and the exports are
  the same for both.

`SCHEMES` is keyed by bits because bits alone name a storage format everywhere else: the recipe's
`weights.bits`, the checkpoint's layer spec and `SinkQuantLinear(bits=...)`. A second scheme at the same
bit width would need a name in all three first.

Modules: `base` (`Stored`, `PytorchKernel`, `WeightScheme`, the registry), `int8` and `int4` (each
scheme with its PyTorch kernel).
"""

from .base import SCHEMES, PytorchKernel, Stored, WeightScheme, register_scheme, scheme_for

# registered in this order: int8, then int4 (the order of `SCHEMES`)
from .int8 import Int8PerChannel  # isort: skip
from .int4 import Int4Grouped  # isort: skip

__all__ = [
    "SCHEMES",
    "Int4Grouped",
    "Int8PerChannel",
    "PytorchKernel",
    "Stored",
    "WeightScheme",
    "register_scheme",
    "scheme_for",
]
