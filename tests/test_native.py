"""The native gathered-core op (csrc/): the CPU twin is built once per session (ninja + the
C++ compiler, ~20 s the first time, cached afterwards) and checked against the reference; the
CUDA kernel only where nvcc and a CUDA PyTorch exist."""
import shutil

import pytest
import torch

from svk import _native
from svk.ops.sv_bank_linear import sv_bank_linear
from tests.utils import rel_err


@pytest.fixture(scope="module")
def native():
    if not _native.build():
        status = _native.status()["gather_core_cpu"]
        toolchain = shutil.which("ninja") and (shutil.which("c++") or shutil.which("g++"))
        if "not found" in status[1] or not toolchain:
            pytest.skip(f"no sources or no C++ toolchain here: {status[1]}")
        pytest.fail(f"the CPU twin must build where ninja and a C++ compiler exist: {status[1]}")
    return torch.ops.svk_native


def expected(p, cores, ids, transpose):
    c = cores.double()
    rows = []
    for i in range(p.shape[0]):
        if 0 <= ids[i] < cores.shape[0]:
            core = c[ids[i]] if transpose else c[ids[i]].t()
            rows.append(p[i].double() @ core)
        else:
            rows.append(torch.zeros(p.shape[1], dtype=torch.float64))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("rank", [1, 7, 16, 33])
def test_cpu_twin_matches_reference(native, dtype, transpose, rank):
    p = torch.randn(37, rank)
    cores = torch.randn(9, rank, rank).to(dtype)
    ids = torch.randint(-1, 9, (37,))
    ids[3] = 50  # out of range reads nothing
    u = native.gather_core(p, cores, ids, transpose)
    assert u.dtype == torch.float32 and u.shape == (37, rank)
    assert rel_err(u, expected(p, cores, ids, transpose)) < 1e-6


def test_cpu_twin_strided_cores_and_int32_ids(native):
    storage = torch.randn(5, 12, 12)
    cores = storage[:, 2:10, 2:10]          # not contiguous: read through strides, no copy
    p = torch.randn(6, 8, dtype=torch.float16)
    ids = torch.tensor([4, 0, -1, 2, 2, 1], dtype=torch.int32)
    u = native.gather_core(p, cores, ids, False)
    assert rel_err(u, expected(p.float(), cores, ids, False)) < 1e-6


def test_cpu_twin_errors(native):
    with pytest.raises(RuntimeError, match="cores must be"):
        native.gather_core(torch.randn(3, 4), torch.randn(2, 4, 5),
                           torch.zeros(3, dtype=torch.long), False)
    with pytest.raises(RuntimeError, match="ids must be int32 or int64"):
        native.gather_core(torch.randn(3, 4), torch.randn(2, 4, 4), torch.zeros(3), False)


def test_native_backend_of_the_op(native):
    x = torch.randn(4, 3, 24)
    weight, a, s = torch.randn(20, 24), torch.randn(6, 24), torch.rand(6)
    b, cores = torch.randn(20, 6), torch.randn(5, 6, 6, requires_grad=True)
    ids = torch.tensor([3, -1, 0, 4])
    y = sv_bank_linear(x, weight, a, s, b, cores, ids, scaling=0.3, backend="native")
    cores_ref = cores.detach().clone().requires_grad_()
    y_ref = sv_bank_linear(x, weight, a, s, b, cores_ref, ids, scaling=0.3, backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(cores.grad, cores_ref.grad, rtol=1e-5, atol=1e-5)


def test_fake_kernel_traces(native):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        u = native.gather_core(torch.empty(5, 4), torch.empty(3, 4, 4),
                               torch.empty(5, dtype=torch.long), False)
    assert u.shape == (5, 4) and u.dtype == torch.float32


def test_status_reports_every_piece(native):
    status = _native.status()
    assert set(status) == {"gather_core_cpu", "gather_core_cuda"}
    assert status["gather_core_cpu"][0]
    for ok, reason in status.values():
        assert isinstance(ok, bool) and isinstance(reason, str) and reason


@pytest.mark.gpu
def test_cuda_kernel_matches_reference(native):
    if not _native.loaded("cuda"):
        pytest.skip(f"CUDA piece unavailable: {_native.status()['gather_core_cuda'][1]}")
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.randn(300, 16, device="cuda")
        cores = torch.randn(1000, 16, 16, device="cuda").to(dtype)
        ids = torch.randint(-1, 1000, (300,), device="cuda")
        for transpose in (False, True):
            u = native.gather_core(p, cores, ids, transpose)
            assert rel_err(u.cpu(), expected(p.cpu(), cores.cpu(), ids.cpu(), transpose)) < 1e-5
