"""Adapter methods as modules (DESIGN.md §4). Every class subclasses SVLinear and has
``from_linear(linear, **hyperparameters)`` for nn.Linear and GPT-2's Conv1D.

| class        | method=   | trainable                 | init                         | scaling |
| ------------ | --------- | ------------------------- | ---------------------------- | ------- |
| LoRAXSLinear | "lora_xs" | core (r×r)                | core ~ N(0, 1e-5²)           | alpha/r |
| SARALinear   | "sara"    | a, s, b (rank k from tau) | a, b Kaiming-uniform, s = 0  | 1       |
| MoSARALinear | "mosara"  | lambdas, gates, out_scale | lambdas Kaiming-uniform      | 1       |
| KaSALinear   | "kasa"    | a, s, b (+ regulariser)   | a Kaiming, s ~ N(0,1), b = 0 | alpha/r |
| SiVALinear   | "siva"    | s (bottom k from perc)    | s = 0                        | 1       |
| LoRALinear   | "lora"    | a, b                      | a Kaiming-uniform, b = 0     | alpha/r |
| PiSSALinear  | "pissa"   | a, b (base: the residual) | top-r SVD, √S each side      | 1       |

Defaults and their sources: each class's docstring (SARA's init="v_zero" ablation, SiVA's
criterion, KaSA against its reference code, LoRA-XS's per-task alpha).
"""
from svk.nn.base import SVLinear
from svk.nn.factored import KaSALinear, LoRALinear, PiSSALinear, SARALinear
from svk.nn.frozen_basis import LoRAXSLinear, MoSARALinear, SiVALinear

METHODS = {cls.method: cls for cls in (LoRAXSLinear, SARALinear, MoSARALinear, KaSALinear,
                                        SiVALinear, LoRALinear, PiSSALinear)}

__all__ = ["SVLinear", "LoRAXSLinear", "SARALinear", "MoSARALinear", "KaSALinear", "SiVALinear",
           "LoRALinear", "PiSSALinear", "METHODS"]

# Quantized bases (bitsandbytes, torchao): svk.nn.quantized, after METHODS (it derives from them).
from svk.nn.quantized import QuantizedSVLinear, quantized_class  # noqa: E402

__all__ += ["QuantizedSVLinear", "quantized_class"]
