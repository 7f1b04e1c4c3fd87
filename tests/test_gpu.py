"""What only a GPU can check: bf16 through the kernels (the interpreter gets bf16 wrong),
TF32 on and off, torch.compile, CUDA-graph capture, opcheck of the Triton path.
Skipped on machines without CUDA; where CUDA exists the conftest leaves Triton's interpreter
off, so these run the compiled kernels."""
import pytest
import torch

import svk
from tests.utils import set_env
from tests.test_sv_linear import FLAGS, as_dtype, call, check_against_oracle, make_inputs

pytestmark = pytest.mark.gpu


def cuda_inputs(**kw):
    t = make_inputs(**kw)
    return {k: None if v is None else v.detach().cuda().requires_grad_(v.requires_grad)
            for k, v in t.items()}


@pytest.mark.parametrize("strategy", ["fused", "one_pass", "merged"])
@pytest.mark.parametrize("bias,core,out_scale", FLAGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernels_match_oracle(monkeypatch, strategy, bias, core, out_scale, dtype):
    set_env(monkeypatch, "SVK_STRATEGY", strategy)
    t = cuda_inputs(lead=(3, 41), in_f=200, out_f=136, r=16, dtype=dtype, bias=bias, core=core,
                    out_scale=out_scale)
    check_against_oracle(t, 0.5, dtype, backend="triton")


@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_fp32_tf32(monkeypatch, tf32):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    t = cuda_inputs(lead=(300,), in_f=256, out_f=192, r=32)
    # TF32 rounds operands to 10 mantissa bits; PyTorch's own TF32 matmul sets the bound.
    check_against_oracle(t, 1.0, torch.float32, backend="triton")


def test_gpu_compile_fullgraph():
    t = cuda_inputs(lead=(64,), in_f=128, out_f=96, r=8, dtype=torch.bfloat16)
    eager = call(svk.sv_linear, t, 1.0)
    compiled = torch.compile(lambda tt: call(svk.sv_linear, tt, 1.0), fullgraph=True)
    y = compiled(t)
    torch.testing.assert_close(y, eager)
    y.float().sum().backward()


def test_gpu_cuda_graph_capture():
    t = cuda_inputs(lead=(8,), in_f=128, out_f=96, r=8, dtype=torch.bfloat16, trainable=())
    call(svk.sv_linear, t, 1.0)  # warm-up: autotuning and compilation happen outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(svk.sv_linear, t, 1.0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call(svk.sv_linear, t, 1.0)
    t["x"].copy_(torch.randn_like(t["x"]))
    graph.replay()
    torch.testing.assert_close(y, call(svk.sv_linear, t, 1.0))


@pytest.mark.parametrize("strategy", ["fused", "one_pass", "merged"])
def test_gpu_opcheck(strategy):
    t = cuda_inputs(lead=(33,), in_f=64, out_f=48, r=8, dtype=torch.bfloat16)
    args = (t["x"], t["weight"], t["a"], t["s"], t["b"], t["bias"], t["core"], t["out_scale"],
            0.5, 0.0, 0, strategy)
    torch.library.opcheck(torch.ops.svk.sv_linear.default, args)


def test_gpu_auto_uses_triton():
    from svk.kernels._common import LAUNCHES
    t = as_dtype(cuda_inputs(lead=(16,), in_f=64, out_f=48, r=8), None)
    before = sum(LAUNCHES.values())
    call(svk.sv_linear, t, 1.0)
    assert sum(LAUNCHES.values()) > before
