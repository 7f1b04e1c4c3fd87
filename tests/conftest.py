import os

import pytest
import torch

# Without a GPU, Triton's interpreter runs every kernel on CPU tensors, so CI still tests each
# of them. It must be switched on before any kernel module is imported (importing torch does not
# import them). With a GPU the same tests run on CUDA tensors through the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _svk_settings():
    """svk reads SVK_BACKEND/SVK_STRATEGY once; tests change them with tests.utils.set_env.
    Autouse fixtures are set up before monkeypatch and torn down after it, so this reload
    sees the environment monkeypatch restored."""
    yield
    from svk.ops import _dispatch
    _dispatch.reload_settings()
