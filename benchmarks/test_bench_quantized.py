"""A whole-model training step (forward + backward + AdamW step) of a small LLaMA-shaped model
whose linear layers are bitsandbytes 4-bit NF4 (QLoRA's base), with adapters on every
projection (DESIGN.md §8, issue 17).

Providers, side by side in one run, on the same quantized base:
  base   no adapter; only the input embeddings train, so backward still runs through every
         quantized layer (dX) but computes no adapter gradient: the floor
  svk    svk.inject(model, cfg): each layer is base_layer(x) (bitsandbytes' own kernel) plus
         svk.ops.sv_delta's rank-r term (svk.nn.quantized)
  peft   PEFT's LoRA on the same bitsandbytes model: QLoRA
Methods: lora (svk vs PEFT, the same update) and lora_xs (no PEFT equivalent). extra_info
records the model shape, tokens, dtype, device, versions and bytes saved for backward.
Skipped when bitsandbytes is not installed.
"""
import os

import pytest
import torch
from torch import nn

from benchmarks.utils import measure_training_step
from svk.integrations import AdapterConfig, inject

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (hidden, intermediate, layers, batch, sequence): LLaMA proportions, scaled to the device.
SHAPE = (4096, 11008, 2, 4, 512) if CUDA else (256, 688, 2, 2, 128)
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [("lora", "base"), ("lora", "svk"), ("lora", "peft"), ("lora_xs", "svk")]


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread on CPU, as benchmarks/test_bench_model.py (shared machines; stable ratios;
    SVK_BENCH_THREADS overrides). Restored afterwards."""
    if CUDA:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SVK_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


def _model():
    """The LLaMA with every projection a bitsandbytes Linear4bit (nf4, compute in DTYPE)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, intermediate, layers, _, sequence = SHAPE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=sequence)
    model = LlamaForCausalLM(config).to(dtype=DTYPE)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, m.bias is not None,
                                  compute_dtype=DTYPE, quant_type="nf4")
            q.load_state_dict(m.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model.to(DEVICE).train()      # bitsandbytes quantizes on the move to the device


def _prepare(method, provider):
    model = _model()
    if provider == "base":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
        return model
    if provider == "peft":
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
        return peft.get_peft_model(model, config)
    inject(model, AdapterConfig(method=method, target_modules=TARGETS, rank=RANK),
           progress=False)
    return model


@pytest.mark.parametrize("method,provider", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_quantized_training_step(benchmark, method, provider):
    hidden, intermediate, layers, batch, sequence = SHAPE
    benchmark.group = (f"qlora step {method} nf4 llama h{hidden} i{intermediate} L{layers} "
                       f"tokens{batch * sequence} r{RANK}")
    model = _prepare(method, provider)
    measure_training_step(benchmark, model, DEVICE, provider=provider,
                          rounds=None if CUDA else 5, method=method, family="quantized",
                          short=f"qlora step {method}", quantization="bitsandbytes nf4",
                          hidden=hidden, intermediate=intermediate, layers=layers,
                          tokens=(batch, sequence), rank=RANK, dtype=str(DTYPE),
                          targets=TARGETS, bitsandbytes=bnb.__version__)
