import pytest
import torch

import fastattn


def cuda_ready():
    return torch.cuda.is_available() and fastattn.has_cuda_kernels()


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    why = ("no CUDA GPU" if not torch.cuda.is_available()
           else "this fastattn build has no CUDA kernels")
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


CPU = pytest.param("cpu", id="cpu")
CUDA = pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)
DEVICES = [CPU, CUDA]

# dtypes each device's kernels take; CPU runs the low-precision ones too.
DTYPES = {
    "cpu": [torch.float32, torch.bfloat16, torch.float16],
    "cuda": [torch.float16, torch.bfloat16],
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
