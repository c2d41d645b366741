// sinkquant's CPU extension: the one compiled file, so the large torch headers are parsed once per
// build. The module is named by sinkquant/kernels/build.py (TORCH_EXTENSION_NAME), one per ISA build.
#include <torch/extension.h>

#include "gemv.h"
#include "kv_dequant.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("unpack_dequantize", &unpack_dequantize);
  pybind11::class_<GemvLayer>(mod, "GemvLayer", pybind11::module_local())  // one per ISA build
      .def(pybind11::init<int64_t, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t,
                          torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, torch::Tensor>())
      .def("__call__", &GemvLayer::forward)
      .def("dequantized", &GemvLayer::dequantized)
      .def("dequantize_into", &GemvLayer::dequantize_into);
  mod.attr("CODES_PER_RUN") = 2 * W;
}
