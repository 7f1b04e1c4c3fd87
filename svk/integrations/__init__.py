"""Model-level API: AdapterConfig, inject, merge/unmerge, adapter files, regularisation."""
from svk.integrations.adapter_io import load_adapter, read_adapter, save_adapter
from svk.integrations.config import AdapterConfig
from svk.integrations.inject import (InjectionSummary, adapted_layers, inject, merge,
                                     regularization_loss, trainable_parameters, unmerge)

__all__ = ["AdapterConfig", "inject", "merge", "unmerge", "save_adapter", "load_adapter",
           "read_adapter", "regularization_loss", "trainable_parameters", "adapted_layers",
           "InjectionSummary"]
