// The CUDA extension, ultimus_kernels._C_cuda: the kernels and launchers of ultimus_cuda.cuh, registered
// as the CUDA kernels of the ops that ultimus_kernels._C defines.
#include <Python.h>
#include <torch/library.h>

#include "ultimus_cuda.cuh"

// Importing ultimus_kernels._C_cuda registers the CUDA kernels of the ops that _C defines. Done here
// rather than by a static TORCH_LIBRARY_IMPL: a stale _C_cuda whose signatures no longer match _C's
// schemas (a rebuild that failed for CUDA only) must fail its import with the reason, not abort the
// process while the library loads.
extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  try {
    static torch::Library kernels(torch::Library::IMPL, "ultimus_ext", c10::DispatchKey::CUDA, __FILE__, __LINE__);
    kernels.impl("fwd", &ultimus::ultimus_fwd_cuda);
    kernels.impl("bwd", &ultimus::ultimus_bwd_cuda);
    kernels.impl("stack_fwd", &ultimus::ultimus_stack_fwd_cuda);
    kernels.impl("stack_bwd", &ultimus::ultimus_stack_bwd_cuda);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return PyModule_Create(&module);
}
