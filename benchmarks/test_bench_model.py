"""A whole-model training step (forward + backward + AdamW step) of a small LLaMA-shaped model
with adapters on every projection, injected with svk.

Providers, side by side in one run (DESIGN.md §7):
  base       the same model with no adapter; only the input embeddings train, so backward
             still runs through every layer (dX) but computes no weight gradient: the floor
  svk        svk.inject(model, cfg): every layer is one fused sv_linear call (backend auto)
  reference  the same injected model with each layer's op swapped for svk.reference.sv_linear
             (LoRA-XS as three linear maps, every intermediate kept by autograd)
  peft       PEFT's LoRA / KaSA (LoraConfig, kasa_config=KasaConfig()) on the same base
Methods: lora_xs (no PEFT equivalent), lora, kasa. extra_info records the model shape, tokens,
dtype, device, versions, bytes saved for backward and (CUDA) peak memory.
"""
import os

import pytest
import torch

from benchmarks.utils import measure_training_step
from svk import reference
from svk.integrations import AdapterConfig, adapted_layers, inject

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (hidden, intermediate, layers, batch, sequence): LLaMA-7B proportions, scaled to the device.
SHAPE = (4096, 11008, 2, 4, 512) if CUDA else (512, 1376, 2, 4, 256)
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [("lora_xs", "base"), ("lora_xs", "svk"), ("lora_xs", "reference"),
         ("lora", "svk"), ("lora", "reference"), ("lora", "peft"),
         ("kasa", "svk"), ("kasa", "reference"), ("kasa", "peft")]


@pytest.fixture(autouse=True)
def _one_thread():
    """On CPU, one thread: the benchmark machines are shared, and two OpenMP threads on two
    busy cores spend their time waiting at barriers (we saw 10× swings); ratios between
    providers are stable single-threaded (SVK_BENCH_THREADS overrides). Restored afterwards."""
    if CUDA:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SVK_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, intermediate, layers, _, sequence = SHAPE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=sequence)
    return LlamaForCausalLM(config).to(device=DEVICE, dtype=DTYPE)


def _prepare(method, provider):
    model = _model()
    if provider == "base":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model
    if provider == "peft":
        peft = pytest.importorskip("peft")
        config = dict(r=RANK, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
        if method == "kasa":
            if not hasattr(peft, "KasaConfig"):
                pytest.skip("this peft has no KaSA")
            config["kasa_config"] = peft.KasaConfig()
        return peft.get_peft_model(model, peft.LoraConfig(**config))
    inject(model, AdapterConfig(method=method, target_modules=TARGETS, rank=RANK),
           progress=False)
    if provider == "reference":
        for layer in adapted_layers(model).values():
            layer.op = reference.sv_linear
    return model


@pytest.mark.parametrize("method,provider", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_model_training_step(benchmark, method, provider):
    hidden, intermediate, layers, batch, sequence = SHAPE
    benchmark.group = (f"model step {method} llama h{hidden} i{intermediate} L{layers} "
                       f"tokens{batch * sequence} r{RANK}")
    model = _prepare(method, provider)
    measure_training_step(benchmark, model, DEVICE, provider=provider,
                          rounds=None if CUDA else 5, method=method, family="model",
                          short=f"model step {method}", hidden=hidden,
                          intermediate=intermediate, layers=layers, tokens=(batch, sequence),
                          rank=RANK, dtype=str(DTYPE), targets=TARGETS)
