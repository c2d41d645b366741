"""The weight schemes' interface and registry: `Stored` (the integer part as the buffers hold it),
`PytorchKernel` (one layer's weights in a PyTorch integer kernel's layout), `WeightScheme` (one storage
format for the kept columns) and `SCHEMES` (bits -> the scheme that stores them). The package docstring
(`sinkquant.format.schemes`) says what a scheme supplies and why the registry is keyed by bits."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar, NamedTuple, TypeVar

import torch


class Stored(NamedTuple):
    """The integer part as the buffers hold it (`weight`, `weight_scale`, `weight_min`)."""

    weight: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None = None
    levels: torch.Tensor | None = None  # int4 on a non-uniform grid: what each code stands for (grid.py)


class PytorchKernel(ABC):
    """PyTorch's integer kernel with one layer's weights in the kernel's layout, built once per layer."""

    __slots__ = ()
    #: columns of the activation `matmul` takes (the kept columns as the kernel orders and pads them)
    width: int

    @abstractmethod
    def matmul(self, act: torch.Tensor) -> torch.Tensor:
        """The bare kernel: act [rows, width] bf16, already in the kernel's column order -> [rows, out]."""

    @abstractmethod
    def __call__(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x2 [rows, in] -> (y [rows, out] bf16, x2's outlier columns where the kernel's gather has them
        in x2's dtype already, else None)."""


class WeightScheme(ABC):
    """One storage format for the kept columns; see the module docstring."""

    bits: ClassVar[int]
    name: ClassVar[str]

    @abstractmethod
    def group_size(self, kept: int, requested: int | None) -> int:
        """The group size the layer stores for `kept` columns when `requested` was asked for."""

    @abstractmethod
    def quantize(
        self,
        weight: torch.Tensor,
        group_size: int,
        *,
        symmetric: bool = False,
        importance: torch.Tensor | None = None,
        clip_search: bool = False,
        log_scales: bool = False,
    ) -> Stored:
        """Round-to-nearest of weight [out, kept] float32; `importance` [kept] weighs a clip search."""

    def buffers(
        self, stored: Stored, kept: int, group_size: int, symmetric: bool = False, log_scales: bool = False
    ) -> dict[str, torch.Tensor]:
        """What the layer's buffers (`storage`'s names) hold for `stored`."""
        buffers = {"weight": stored.weight, "weight_scale": stored.scale}
        if stored.minimum is not None and not symmetric:
            buffers["weight_min"] = stored.minimum
        return buffers

    def read(self, buffers: Mapping[str, torch.Tensor | None]) -> Stored:
        """The integer part from the layer's buffers (the inverse of `buffers`)."""
        return Stored(buffers["weight"], buffers["weight_scale"], buffers.get("weight_min"))

    @abstractmethod
    def store(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> Stored:
        """Integers chosen elsewhere (GPTQ), in the format `quantize` returns them before storage."""

    # -- one group at a time, for GPTQ (it fits each group's range when the sweep reaches it) ----------
    #: dtypes of one group's scale and of the codes `store` takes
    scale_dtype: ClassVar[torch.dtype]
    code_dtype: ClassVar[torch.dtype]

    @abstractmethod
    def group_range(
        self, values: torch.Tensor, symmetric: bool, log_scales: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale [out], minimum [out] or None) of one group from its weights [out, n], by `quantize`'s
        formulas (so what GPTQ stores is what round-to-nearest would store for the same weights)."""

    @abstractmethod
    def round_to_range(
        self, values: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """values [out] or [out, n] on one group's grid -> (codes as float32, dequantized float32)."""

    @abstractmethod
    def group_params(
        self, scale: torch.Tensor, minimum: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-group scale (and minimum) [out, groups] as `store` takes them."""

    def minimum(self, stored: Stored) -> torch.Tensor | None:
        """Each group's minimum as stored, or None for a scheme without minima."""
        return stored.minimum

    @abstractmethod
    def dequantize(self, stored: Stored, kept: int, group_size: int) -> torch.Tensor:
        """float32 [out, kept]: the integer part as real numbers."""

    @abstractmethod
    def fused_args(self, stored: Stored, kept: int) -> tuple:
        """(bits, codes, scale, minimum): the scheme's part of what `kernels.bind_layer` takes."""

    @abstractmethod
    def kernel_available(self) -> bool:
        """Whether this torch build has the scheme's PyTorch CPU kernel."""

    @abstractmethod
    def kernel_applies(self, act_dtype: torch.dtype, out_features: int, group_size: int) -> bool:
        """Whether the PyTorch kernel serves activations of `act_dtype` at this shape."""

    @abstractmethod
    def fallback_rounds_to_bf16(self, act_dtype: torch.dtype) -> bool:
        """Whether the dequantizing fallback rounds activations to bf16 first, as the kernel would for
        `act_dtype`, so that switching the kernels off keeps the activation precision."""

    @abstractmethod
    def pytorch_kernel(
        self,
        stored: Stored,
        keep: torch.Tensor,
        outlier_idx: torch.Tensor,
        in_features: int,
        group_size: int,
    ) -> PytorchKernel:
        """The PyTorch kernel bound to these weights; `keep` [kept] and `outlier_idx` say where the
        kept and the outlier columns sit in an input row of `in_features`."""


#: bits -> the scheme that stores them
SCHEMES: dict[int, WeightScheme] = {}
_S = TypeVar("_S", bound=type[WeightScheme])


def register_scheme(cls: _S) -> _S:
    """Class decorator: put one instance of `cls` in `SCHEMES` under `cls.bits`."""
    if cls.bits in SCHEMES:
        raise ValueError(f"bits {cls.bits} already has a weight scheme ({SCHEMES[cls.bits].name})")
    SCHEMES[cls.bits] = cls()
    return cls


def scheme_for(bits: int) -> WeightScheme:
    """The scheme registered for `bits`; a clear ValueError for any other value."""
    scheme = SCHEMES.get(bits)
    if scheme is None:
        known = ", ".join(str(b) for b in sorted(SCHEMES))
        raise ValueError(f"SinkQuantLinear has no weight scheme for {bits!r} bits (it supports {known})")
    return scheme
