"""Adapter methods as modules (DESIGN.md §4). Every class subclasses SVLinear and has
``from_linear(linear, **hyperparameters)`` for nn.Linear and GPT-2's Conv1D.

| class          | method=     | trainable                             | scaling  |
| -------------- | ----------- | ------------------------------------- | -------- |
| LoRAXSLinear   | "lora_xs"   | core (r×r)                            | alpha/r  |
| SARALinear     | "sara"      | a, s, b (rank k from tau)             | 1        |
| MoSARALinear   | "mosara"    | lambdas, gate_in, gate_out, out_scale | 1        |
| KaSALinear     | "kasa"      | a, s, b (+ regulariser)               | alpha/r  |
| SiVALinear     | "siva"      | s (bottom k from perc)                | 1        |
| LoRALinear     | "lora"      | a, b                                  | alpha/r  |
| PiSSALinear    | "pissa"     | a, b (base keeps the residual)        | 1        |
"""
from svk.nn.base import SVLinear
from svk.nn.factored import KaSALinear, LoRALinear, PiSSALinear, SARALinear
from svk.nn.frozen_basis import LoRAXSLinear, MoSARALinear, SiVALinear

METHODS = {cls.method: cls for cls in (LoRAXSLinear, SARALinear, MoSARALinear, KaSALinear,
                                        SiVALinear, LoRALinear, PiSSALinear)}

__all__ = ["SVLinear", "LoRAXSLinear", "SARALinear", "MoSARALinear", "KaSALinear", "SiVALinear",
           "LoRALinear", "PiSSALinear", "METHODS"]
