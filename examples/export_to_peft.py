"""Train LoRA-XS with svk, export it as a PEFT LoRA checkpoint, load it with PeftModel (CPU,
seconds).

    python examples/export_to_peft.py                     # LoRA-XS, 20 steps, ./peft_export
    python examples/export_to_peft.py --method kasa --out /tmp/kasa_as_lora

A tiny LLaMA (hidden 64, 2 layers, vocab 128) is built from its config, so nothing is
downloaded. The script keeps a copy of the original base, injects the method into every
projection, trains a few steps of next-token prediction on a repeating token pattern, then

    svk.export_peft(model, out)                               # exact, no SVD truncation
    peft_model = PeftModel.from_pretrained(original_base, out)

and prints the max relative difference between the svk model's and PeftModel's logits (fp32:
about 1e-7, float rounding) and the rank PEFT sees. The same directory loads in vLLM
(``--enable-lora --max-lora-rank`` ≥ the printed rank) and in anything else that reads PEFT
LoRA. Needs transformers and peft.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch

from svk.integrations import AdapterConfig, inject
from svk.integrations.peft_io import export_peft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora_xs",
                        choices=["lora_xs", "sara", "kasa", "siva", "lora", "pissa"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="peft_export")
    args = parser.parse_args()

    from peft import PeftModel

    torch.manual_seed(0)
    model = tiny_llama()
    original_base = copy.deepcopy(model).eval()   # what PEFT/vLLM users load from the hub
    summary = inject(model, AdapterConfig(method=args.method, target_modules=TARGETS))
    print(f"{args.method}: {len(summary.layers)} layers, {summary.trainable} trainable "
          "parameters")

    # A learnable toy task: predict the next token of a repeating pattern.
    pattern = torch.randint(0, 128, (12,))
    data = torch.stack([torch.roll(pattern.repeat(3), -shift)[:32] for shift in range(8)])
    # LoRA-XS trains an r×r core that starts at ~1e-5, hence the larger learning rate.
    lr = 0.05 if args.method == "lora_xs" else 5e-3
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(args.steps):
        loss = model(data, labels=data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (0, args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    config = export_peft(model, args.out)
    print(f"wrote {os.path.join(args.out, 'adapter_config.json')} and "
          f"adapter_model.safetensors: r={config['r']}, lora_alpha={config['lora_alpha']}, "
          f"{len(config['rank_pattern'])} per-module ranks, "
          f"target_modules={json.dumps(config['target_modules'])}")

    peft_model = PeftModel.from_pretrained(original_base, args.out).eval()
    with torch.no_grad():
        ours = model(data).logits
        theirs = peft_model(data).logits
    error = ((ours - theirs).abs().max() / ours.abs().max()).item()
    print(f"max |svk − PeftModel| / max |svk| over the logits: {error:.2e}")


if __name__ == "__main__":
    main()
