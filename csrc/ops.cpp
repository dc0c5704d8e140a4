// The one place where vaefast's operator schemas live (cf. torchvision/csrc/ops, extension-cpp).
// Kernels register themselves per device in csrc/cpu/*.cpp and csrc/cuda/*.cu with TORCH_LIBRARY_IMPL;
// fake (meta) kernels and autograd live on the Python side in vaefast/ops.py.

#include <Python.h>

#include <torch/library.h>

extern "C" {
// An (empty) Python module so that `import vaefast._C` loads the library and runs the registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace vaefast {

bool compiled_with_cuda() {
#ifdef VAEFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(vaefast, m) {
  // z[b, s, :] = mu[b] + exp(logvar[b] / 2) * eps[b, s, :], eps from Philox4x32-10 keyed by
  // (seed; offset + id(b), sample_offset + s, latent index) with a shared Box-Muller transform; id(b) = point_ids[b]
  // (int64 [B] on mu's device) when given, else b.
  m.def(
      "reparam_sample(Tensor mu, Tensor logvar, int num_samples, int seed, int offset, int sample_offset, "
      "Tensor? point_ids=None) -> Tensor");
  // hits[b, k] = #{s : ||y[b, s] - center[b]||_2 <= radii[k]}; distances[b, s] when asked (else empty).
  m.def("sphere_hits(Tensor y, Tensor center, Tensor radii, bool return_distances) -> (Tensor, Tensor)");
  // ||d mu / d x||_F per point for mu = W_L phi(... phi(W_1 x + b_1) ...) + b_L; `first_gram` = W_1 W_1^T.
  m.def(
      "mlp_jacobian_frobenius(Tensor x, Tensor[] weights, Tensor[] biases, str activation, float activation_param, "
      "Tensor? first_gram) -> Tensor");
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
}

}  // namespace vaefast
