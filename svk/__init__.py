"""svk: singular-value kernels. Fused Triton kernels for SVD-based adapters.

    svk.sv_linear, svk.sv_mixture_linear, svk.sv_bank_linear   the fused ops (DESIGN.md §2)
    svk.nn                                                      adapter layers per method
    svk.AdapterConfig, svk.inject, svk.merge, svk.unmerge,
    svk.save_adapter, svk.load_adapter, svk.regularization_loss,
    svk.trainable_parameters, svk.print_trainable_parameters,
    svk.unload, svk.disable_adapter                             model integration
    svk.export_peft, svk.import_peft                            PEFT LoRA checkpoints
    svk.AdapterBank                                             many LoRA-XS users, one batch
    svk.warmup                                                  tune kernels before a capture
    svk.linalg                                                  batched SVD for initialisation
    svk.reference                                               the naive oracle
"""
__version__ = "0.2.0"

from svk import linalg, nn, reference, warmup  # noqa: E402
from svk.integrations import (AdapterConfig, disable_adapter, inject, load_adapter,  # noqa: E402
                              merge, print_trainable_parameters, regularization_loss,
                              save_adapter, trainable_parameters, unload, unmerge)
from svk.integrations.peft_io import export_peft, import_peft  # noqa: E402
from svk.ops import sv_bank_linear, sv_linear, sv_mixture_linear  # noqa: E402
from svk.serving import AdapterBank  # noqa: E402

__all__ = ["__version__", "sv_linear", "sv_mixture_linear", "sv_bank_linear", "nn", "linalg",
           "reference", "AdapterConfig", "inject", "merge", "unmerge", "save_adapter",
           "load_adapter", "regularization_loss", "trainable_parameters",
           "print_trainable_parameters", "unload", "disable_adapter", "export_peft",
           "import_peft", "AdapterBank", "warmup"]
