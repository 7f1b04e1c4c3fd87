import os

# Triton's interpreter must be switched on before any kernel module is imported: every Triton
# kernel then runs on CPU tensors, so CI (no GPU) still tests each of them.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("SVK_TEST_CUDA") == "1" else "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
