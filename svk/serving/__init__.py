"""Serving many per-user LoRA-XS adapters on one base model (DESIGN.md §6)."""
from svk.serving.bank import AdapterBank, BankLinear

__all__ = ["AdapterBank", "BankLinear"]
