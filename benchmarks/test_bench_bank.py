"""Serving many LoRA-XS adapters: a decode step where every row is a different adapter.

Providers, side by side in one run (DESIGN.md §6–7):
  base       the frozen layer / model without adapters: the floor
  svk        sv_bank_linear / AdapterBank, backend auto (PyTorch on CPU, Triton on CUDA);
             on CUDA also each Triton strategy forced (svk-one_pass, svk-fused)
  native     sv_bank_linear with the compiled gathered-core op (csrc/), when it builds
  reference  svk.reference.sv_bank_linear: one masked pass per distinct adapter, as PEFT's
             mixed-batch forward does
  merge      merging per request: W_eff = W + scaling·b·core·diag(s)·a for each row's adapter,
             then that row's GEMM
Resident adapters 1, 100, 10 000 (and 1 000 000 on CUDA): the bank's size should not change
the step's time. extra_info records shapes, adapters per GB of core storage, device, versions.
On CPU the module runs single-threaded (SVK_BENCH_THREADS changes it): decode-sized products
are too small to gain from threads, and on a shared machine thread scheduling swamps the ratios.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks.floors import floors, linear_adapter_work
from benchmarks.utils import measure
from svk import reference
from svk.ops.sv_bank_linear import sv_bank_linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
RANK = 16
# (rows, in, out): decode batches of one layer.
LAYER_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096)] if CUDA else [
    (16, 1024, 1024)]
RESIDENT = [1, 100, 10_000] + ([1_000_000] if CUDA else [])
PROVIDERS = ["base", "svk", "native", "reference", "merge"] + (
    ["svk-one_pass", "svk-fused"] if CUDA else [])


@pytest.fixture(autouse=True, scope="module")
def _threads():
    if CUDA:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SVK_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


def _rounds(provider):
    return 5 if provider == "merge" else 30


def _native_ok():
    from svk import _native
    return _native.ensure_built(DEVICE)


def adapters_per_gb(layers, dtype):
    return int(1e9 // (layers * RANK * RANK * torch.empty((), dtype=dtype).element_size()))


def merged_rows(x, weight, bias, a, s, b, cores, ids, scaling):
    """One merge and one GEMM per request (row)."""
    right = a.float() * s.float()[:, None]
    rows = []
    for i, adapter in enumerate(ids.tolist()):
        w_eff = weight if adapter < 0 else (
            weight.float() + scaling * b.float() @ (cores[adapter].float() @ right)).to(x.dtype)
        rows.append(F.linear(x[i:i + 1], w_eff, bias))
    return torch.cat(rows)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("resident", RESIDENT)
@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "M{}-in{}-out{}".format(*s))
def test_bank_layer_decode(benchmark, svk_strategy, provider, resident, shape):
    m, in_f, out_f = shape
    if provider == "native" and not _native_ok():
        pytest.skip("the native op did not build (see python -m svk.info)")
    if provider in ("reference", "merge") and CUDA and m > 16:
        pytest.skip("a loop over 256 adapters per layer: orders of magnitude off, and slow")
    if provider.startswith("svk-"):
        svk_strategy(provider.split("-")[1])
    benchmark.group = f"bank layer decode M{m} in{in_f} out{out_f} r{RANK} resident{resident}"
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(shape, generator=g, device=DEVICE) * scale).to(dtype)
    x = rand(m, in_f, dtype=DTYPE)
    weight, bias = rand(out_f, in_f, dtype=DTYPE, scale=in_f ** -0.5), rand(out_f, dtype=DTYPE)
    a, s, b = rand(RANK, in_f, scale=in_f ** -0.5), rand(RANK), rand(out_f, RANK, scale=0.1)
    cores = rand(resident, RANK, RANK, dtype=DTYPE, scale=0.1)
    # Every row a different adapter (as far as the bank holds them), spread over the bank.
    ids = (torch.arange(m, device=DEVICE) * 7919) % resident
    backend = "native" if provider == "native" else "auto"

    def run():
        with torch.no_grad():
            if provider == "base":
                return F.linear(x, weight, bias)
            if provider == "reference":
                return reference.sv_bank_linear(x, weight, a, s, b, cores, ids, bias=bias)
            if provider == "merge":
                return merged_rows(x, weight, bias, a, s, b, cores, ids, 1.0)
            return sv_bank_linear(x, weight, a, s, b, cores, ids, bias=bias, backend=backend)
    work = linear_adapter_work(m, in_f, out_f, RANK, x.element_size(), mode="fwd", core=True,
                               cores_read=min(m, resident) * RANK * RANK * cores.element_size())
    measure(benchmark, run, DEVICE, provider=provider, rounds=_rounds(provider), M=m,
            in_features=in_f, out_features=out_f, rank=RANK, dtype=str(DTYPE),
            resident_adapters=resident, distinct_in_batch=min(m, resident),
            adapters_per_gb_per_layer=adapters_per_gb(1, DTYPE),
            cores_bytes=cores.numel() * cores.element_size(), **floors(*work, DEVICE, DTYPE))


# Whole model ------------------------------------------------------------------------------

MODEL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
if CUDA:
    MODEL.update(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=16)
MODEL_BATCH = 64 if CUDA else 16
MODEL_PROVIDERS = ["base", "svk", "native", "reference", "merge"]


@pytest.fixture(scope="module")
def served_models():
    transformers = pytest.importorskip("transformers")
    from svk.integrations import AdapterConfig
    from svk.serving import AdapterBank
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).to(DEVICE, DTYPE)
    base.eval()
    cfg = AdapterConfig(method="lora_xs", rank=RANK, target_modules=["q_proj", "v_proj"])
    served = copy.deepcopy(base)
    bank = AdapterBank(served, cfg, capacity=max(RESIDENT), progress=False)
    for k in range(MODEL_BATCH):   # named adapters for the batch; the rest of the bank is filled
        bank.add(f"user{k}", {f"{n}.core": torch.randn(RANK, RANK) * 0.1 for n in bank.layers})
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.cores[MODEL_BATCH:].normal_(0, 0.1)
    return base, served, bank


class _Swap:
    """Temporarily serves the bank layers through another provider."""

    def __init__(self, bank, provider, resident):
        self.bank, self.provider, self.resident = bank, provider, resident

    def __enter__(self):
        for layer in self.bank.layers.values():
            layer._saved = (layer.cores, layer.backend, layer.forward)
            layer.cores = layer.cores[:self.resident]
            if self.provider == "native":
                layer.backend = "native"
            elif self.provider in ("reference", "merge"):
                layer.forward = self._forward(layer)
        return self

    def _forward(self, layer):
        def forward(x):
            ids = layer._ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]).reshape(-1)
            x2 = x.reshape(-1, x.shape[-1])
            if self.provider == "reference":
                y = reference.sv_bank_linear(x2, layer.weight, layer.a, layer.s, layer.b,
                                             layer.cores, ids, bias=layer.bias,
                                             scaling=layer.scaling)
            else:
                y = merged_rows(x2, layer.weight, layer.bias, layer.a, layer.s, layer.b,
                                layer.cores, ids, layer.scaling)
            return y.reshape(*x.shape[:-1], -1)
        return forward

    def __exit__(self, *exc):
        for layer in self.bank.layers.values():
            layer.cores, layer.backend, forward = layer._saved
            if "forward" in layer.__dict__:
                del layer.forward
            del layer._saved


@pytest.mark.parametrize("provider", MODEL_PROVIDERS)
@pytest.mark.parametrize("resident", [r for r in RESIDENT if r >= MODEL_BATCH or r == 1])
def test_bank_model_decode_step(benchmark, served_models, provider, resident):
    """One token per sequence through the whole model (the decode step's shape; no KV cache,
    so attention is trivial and the linear layers dominate, as in decoding)."""
    base, served, bank = served_models
    if provider == "native" and not _native_ok():
        pytest.skip("the native op did not build (see python -m svk.info)")
    benchmark.group = (f"bank model decode batch{MODEL_BATCH} hidden{MODEL['hidden_size']} "
                       f"layers{MODEL['num_hidden_layers']} r{RANK} resident{resident}")
    tokens = torch.randint(0, MODEL["vocab_size"], (MODEL_BATCH, 1), device=DEVICE)
    ids = [k % resident for k in range(MODEL_BATCH)] if resident > 1 else [0] * MODEL_BATCH

    def run():
        with torch.no_grad():
            if provider == "base":
                return base(tokens).logits
            with bank.activate(ids):
                return served(tokens).logits
    with _Swap(bank, provider, resident):
        measure(benchmark, run, DEVICE, provider=provider, rounds=_rounds(provider),
                batch=MODEL_BATCH, **MODEL,
                rank=RANK, dtype=str(DTYPE), resident_adapters=resident,
                adapted_layers=len(bank.layers),
                adapters_per_gb=adapters_per_gb(len(bank.layers), bank.layers[
                    next(iter(bank.layers))].cores.dtype))
