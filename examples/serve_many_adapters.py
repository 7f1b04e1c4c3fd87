"""Serve many per-user LoRA-XS adapters from one base model, mixed in one batch.

Three "users" each fine-tune a LoRA-XS adapter (only an r×r core per layer trains) on a tiny
LLaMA for a different synthetic task, and save it with svk.save_adapter. An AdapterBank then
holds all three on one copy of the base model, and a single model.generate call serves a
batch whose rows belong to different users (and one to the base model): every row follows
its own user's task. Then one user's whole batch runs through merged weights (bank.merged:
one GEMM per layer, the base model's cost), and a compiled decode step serves new users
without recompiling (activate rewrites the bank's ids buffer in place; the same holds for a
captured CUDA graph). Runs on CPU in a few minutes (training the three adapters and one
compilation take most of it):

    python examples/serve_many_adapters.py
"""
import copy
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from svk.integrations import AdapterConfig, inject, save_adapter
from svk.serving import AdapterBank

VOCAB = 32
TASKS = {
    # name: next token as a function of the current one
    "constant": lambda tok: torch.full_like(tok, 7),       # always answers 7
    "increment": lambda tok: (tok + 1) % VOCAB,            # counts up
    "repeat": lambda tok: tok.clone(),                      # says the same token again
}
CFG = AdapterConfig(method="lora_xs", rank=8, alpha=16,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"])


def batch_for(task, batch=16, length=10):
    """Sequences that follow the task from a random first token."""
    first = torch.randint(0, VOCAB, (batch, 1))
    seq = [first]
    for _ in range(length - 1):
        seq.append(TASKS[task](seq[-1]))
    return torch.cat(seq, dim=1)


def train(base, task, steps=80):
    model = copy.deepcopy(base)
    inject(model, CFG, progress=False)       # freezes the base; only the cores train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    for _ in range(steps):
        tokens = batch_for(task)
        loss = model(tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"  {task:<9} final loss {loss.item():.3f}  ({sum(p.numel() for p in params)} trainable "
          "parameters)")
    return model


def main():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)).eval()
    folder = tempfile.mkdtemp(prefix="svk-adapters-")
    start = time.perf_counter()
    print("training one LoRA-XS adapter per user:")
    for task in TASKS:
        save_adapter(train(base, task), os.path.join(folder, f"{task}.safetensors"))
    print(f"  done in {time.perf_counter() - start:.0f} s\n")

    served = copy.deepcopy(base)
    bank = AdapterBank(served, CFG, capacity=1000)
    for task in TASKS:
        slot = bank.add(task, os.path.join(folder, f"{task}.safetensors"))
        print(f"added {task!r} in slot {slot}")
    print(f"{bank}: {bank.nbytes / 1000 / bank.capacity:.1f} kB per user\n")

    prompts = torch.tensor([[3], [3], [3], [20], [20], [20], [3]])
    users = ["constant", "increment", "repeat", "constant", "increment", "repeat", -1]
    with torch.no_grad(), bank.activate(users):
        out = served.generate(prompts, attention_mask=torch.ones_like(prompts),
                              max_new_tokens=8, do_sample=False, pad_token_id=0)
    print("one mixed batch, one generate call:")
    for user, row in zip(users, out.tolist()):
        print(f"  {('base model' if user == -1 else user):<10} {row}")

    # One user for the whole batch: merged weights, exactly what svk.merge would give.
    with torch.no_grad(), bank.merged("increment"):
        merged = served.generate(prompts, attention_mask=torch.ones_like(prompts),
                                 max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"\n'increment' for the whole batch through merged weights: {merged[0].tolist()}")

    # A compiled decode step (one token per sequence): new users, no recompilation. Serving
    # threads may share the bank: activate blocks of different threads run one at a time.
    step = torch.compile(lambda tokens: served(tokens, use_cache=False).logits)
    tokens = prompts[:4, -1:]
    with torch.no_grad():
        for users in (["constant", "increment", "repeat", -1], ["repeat", -1, "constant",
                                                                "increment"]):
            with bank.activate(users):
                start = time.perf_counter()
                compiled = step(tokens)
                seconds = time.perf_counter() - start
                same = torch.allclose(compiled, served(tokens, use_cache=False).logits,
                                      rtol=1e-4, atol=1e-4)
            print(f"compiled step for {users}: next tokens {compiled[:, -1].argmax(-1).tolist()}"
                  f", same as eager: {same}, {seconds:.2f} s")


if __name__ == "__main__":
    main()
