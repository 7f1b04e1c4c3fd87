"""Serving many per-user LoRA-XS adapters on one base model (DESIGN.md §6).

AdapterBank converts a model's targeted layers into BankLinear layers that hold every user's
r×r cores; `with bank.activate(ids):` serves a batch that mixes users (one id per sequence,
-1 = the base model), `with bank.merged(name):` serves one user to whole batches through merged
weights. The serving model (ids buffer, threads, torch.compile and CUDA graphs) is described
in svk.serving.bank.
"""
from svk.serving.bank import AdapterBank, BankLinear

__all__ = ["AdapterBank", "BankLinear"]
