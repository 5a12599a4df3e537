// Makes the shared library importable as the Python module fastattn._C.
// The ops themselves are registered with the dispatcher by static
// initializers (TORCH_LIBRARY in ops.cpp), which run when it is loaded; no
// Python bindings are needed, so this stays free of pybind11 (compile time).
#include <Python.h>

static struct PyModuleDef fastattn_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "fastattn native ops (see torch.ops.fastattn)", -1,
                                             nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastattn_module); }
