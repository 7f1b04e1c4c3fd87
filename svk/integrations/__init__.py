"""Model-level API: AdapterConfig, inject, merge/unmerge, unload/disable_adapter, adapter
files, regularisation, the Trainer callback (svk.integrations.AdapterCheckpointCallback,
imported on first use: it needs transformers)."""
from svk.integrations.adapter_io import load_adapter, read_adapter, save_adapter
from svk.integrations.config import AdapterConfig
from svk.integrations.inject import (InjectionSummary, adapted_layers, inject, merge,
                                     print_trainable_parameters, regularization_loss,
                                     trainable_parameters, unmerge)
from svk.integrations.surgery import disable_adapter, unload

__all__ = ["AdapterConfig", "inject", "merge", "unmerge", "save_adapter", "load_adapter",
           "read_adapter", "regularization_loss", "trainable_parameters", "adapted_layers",
           "InjectionSummary", "print_trainable_parameters", "unload", "disable_adapter"]
# AdapterCheckpointCallback is left out of __all__: a star import must not need transformers.


def __getattr__(name):
    # transformers is optional for svk; the callback module imports it.
    if name == "AdapterCheckpointCallback":
        from svk.integrations.trainer import AdapterCheckpointCallback
        return AdapterCheckpointCallback
    raise AttributeError(f"module 'svk.integrations' has no attribute {name!r}")
