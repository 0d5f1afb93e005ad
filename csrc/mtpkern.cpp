// The mtpkern operator library: schemas of the C++ ops, and the stub that makes this shared
// object importable as the Python module mtpkern._C (importing it registers the ops).
// Per op: csrc/<op>_api.cpp (CPU kernel, CUDA entry point) and csrc/cuda/<op>.cu (CUDA kernel);
// fake implementations for torch.compile live beside the public functions in mtpkern/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing mtpkern._C loads this library and so runs the TORCH_LIBRARY registrations below;
// the module itself is empty (the ops are reached through torch.ops.mtpkern).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mtpkern, m) {
  m.def("tree_buffers(Tensor parents, int max_depth) -> (Tensor mask, Tensor depth, Tensor retrieve, Tensor is_leaf)");
  m.def(
      "verify_greedy(Tensor tree_tokens, Tensor target_argmax, Tensor paths) -> (Tensor accept_len, Tensor best_path, "
      "Tensor last_node, Tensor tokens)");
  m.def(
      "verify_typical(Tensor tree_tokens, Tensor target_argmax, Tensor node_prob, Tensor parent_entropy, Tensor paths, "
      "float epsilon, float alpha) -> (Tensor accept_len, Tensor best_path, Tensor last_node, Tensor tokens)");
  m.def(
      "accept_greedy(Tensor hidden, Tensor weight, Tensor tree_tokens, Tensor paths) -> (Tensor out, Tensor root, "
      "Tensor last_node, Tensor best_path)");
  m.def(
      "verify_rejection(Tensor tree_tokens, Tensor target_probs, Tensor draft_probs, Tensor draft_row, Tensor parents, "
      "Tensor uniforms, int max_depth) -> (Tensor accept_len, Tensor last_node, Tensor path, Tensor tokens, "
      "Tensor n_emitted)");
  m.def("kv_compact_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor path, Tensor prefix_len, Tensor count) -> ()");
}
