"""svk.AdapterConfig: which layers to adapt, with which method and hyperparameters."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field

HPARAM_NAMES = ("rank", "alpha", "tau", "heads", "perc", "criterion", "beta", "gamma", "init")
CRITERIA = ("sum", "energy")
BACKENDS = ("auto", "triton", "torch")
# PEFT's shorthand (case-insensitive, as in PEFT): every nn.Linear / Conv1D except the output
# layer; resolved against the model by inject.
ALL_LINEAR = "all-linear"


def _methods():
    from svk.nn import METHODS
    return METHODS


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_hparams(method: str, hp: dict) -> None:
    """Raises ValueError/TypeError naming the hyperparameter and the value seen. Converts
    numpy (and other numbers.Real) scalars to Python int/float in place, so that every
    accepted value behaves alike and serialises to JSON (adapter files, AdapterConfig)."""
    def fail(name, rule):
        raise ValueError(f"{method}: {name} must be {rule}, got {hp[name]!r}")

    for name in ("rank", "heads"):
        if name in hp:
            if isinstance(hp[name], bool) or not isinstance(hp[name], numbers.Integral):
                raise TypeError(f"{method}: {name} must be an int, got {hp[name]!r}")
            hp[name] = int(hp[name])
            if hp[name] < 1:
                fail(name, "≥ 1")
    for name in ("alpha", "tau", "perc", "beta", "gamma"):
        if name in hp:
            if not _is_number(hp[name]):
                raise TypeError(f"{method}: {name} must be a number, got {hp[name]!r}")
            # inf or nan would reach every output (alpha through scaling, beta/gamma through
            # the loss) as inf/nan on the first step: refuse them here, by name.
            if not math.isfinite(float(hp[name])):
                fail(name, "a finite number")
            hp[name] = float(hp[name])
    if "alpha" in hp and not hp["alpha"] > 0:
        fail("alpha", "> 0")
    if "tau" in hp and not 0 < hp["tau"] <= 1:
        fail("tau", "in (0, 1]")
    if "perc" in hp and not 0 < hp["perc"] <= 1:
        fail("perc", "in (0, 1]")
    for name in ("beta", "gamma"):
        if name in hp and not hp[name] >= 0:
            fail(name, "≥ 0")
    if "criterion" in hp and hp["criterion"] not in CRITERIA:
        fail("criterion", f"one of {CRITERIA}")


@dataclass
class AdapterConfig:
    """Which layers to adapt and how.

    method: "lora_xs" | "sara" | "mosara" | "kasa" | "siva" | "lora" | "pissa".
    target_modules: a list of module names, each matching a module whose qualified name equals
        it or ends with "." + it (e.g. ["q_proj", "v_proj"]); every entry must match a module
        (a typo raises). Or one regex string that must match the whole qualified name (e.g.
        r".*\\.(query|value)"). Or "all-linear" (PEFT's meaning): every nn.Linear / Conv1D
        except the output layer — a transformers model's get_output_embeddings() module or,
        where it has none, its "score" / "classifier" head (with everything inside it). Only
        nn.Linear and GPT-2 Conv1D modules are adapted.
    Hyperparameters (None = the method's paper default; giving one the method does not use is
    an error): rank, alpha (LoRA-XS, KaSA, LoRA), tau (SARA 0.01, Mo-SARA 0.5), heads (Mo-SARA
    5), perc and criterion (SiVA 0.95, "energy" | "sum"), beta and gamma (KaSA 1e-4, 1e-3),
    init (SARA: "paper" | "v_zero").
    modules_to_save: names of modules (matched like target_modules' names) that are not adapted
        but train in full and are stored in the adapter file, e.g. a classifier head
        (PEFT's ``modules_to_save``); None for none.
    dropout: adapter dropout in [0, 1) (PEFT's lora_dropout), on the adapter path's input
        while training; the base GEMM sees x. 0.0 by default; the papers use 0.05 (SARA,
        Mo-SARA and KaSA on LLaMA; KaSA 0.1 for NLG).
    backend: passed to the fused ops ("auto" | "triton" | "torch").
    seed: seeds the randomized SVD and the random initial factors, so that injecting the same
        config into the same base model gives the same adapter (None: global RNG).
    """

    method: str
    target_modules: list[str] | str
    rank: int | None = None
    alpha: float | None = None
    tau: float | None = None
    heads: int | None = None
    perc: float | None = None
    criterion: str | None = None
    beta: float | None = None
    gamma: float | None = None
    init: str | None = None
    modules_to_save: list[str] | None = None
    dropout: float = 0.0
    backend: str = "auto"
    seed: int | None = 0
    _pattern: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        methods = _methods()
        if self.method not in methods:
            raise ValueError(f"method must be one of {sorted(methods)}, got {self.method!r}")
        cls = methods[self.method]
        given = {name for name in HPARAM_NAMES if getattr(self, name) is not None}
        unused = sorted(given - set(cls.HPARAMS))
        if unused:
            raise ValueError(f"method {self.method!r} takes {sorted(cls.HPARAMS)}; "
                             f"{unused} must be left as None")
        resolved = cls.resolve_hparams(**{name: getattr(self, name) for name in given})
        for name in given:      # numpy scalars become int/float (validate_hparams)
            setattr(self, name, resolved[name])
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR
        elif isinstance(self.target_modules, str):
            try:
                self._pattern = re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(f"target_modules is not a valid regex "
                                 f"({self.target_modules!r}): {error}") from None
        elif isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t
                                                  for t in self.target_modules):
                raise ValueError("target_modules must be a non-empty list of module names, got "
                                 f"{self.target_modules!r}")
            self.target_modules = list(self.target_modules)
        else:
            raise TypeError(f"target_modules must be a list of names or a regex string, got "
                            f"{type(self.target_modules).__name__}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                    isinstance(t, str) and t for t in self.modules_to_save):
                raise TypeError("modules_to_save must be a list of module names, got "
                                f"{self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        from svk.ops._checks import dropout as _check_dropout
        self.dropout = _check_dropout(self.dropout)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def method_class(self):
        return _methods()[self.method]

    def hparams(self) -> dict:
        """The method's hyperparameters with paper defaults filled in."""
        given = {name: getattr(self, name) for name in HPARAM_NAMES}
        return self.method_class.resolve_hparams(
            **{name: value for name, value in given.items() if value is not None})

    @property
    def all_linear(self) -> bool:
        return self.target_modules == ALL_LINEAR

    def matches(self, name: str) -> bool:
        """Whether a module name is targeted by name. With "all-linear" every name matches
        here; inject then leaves out the model's output layer, which a name cannot tell."""
        if self.all_linear:
            return True
        if self._pattern is not None:
            return self._pattern.fullmatch(name) is not None
        return any(_name_matches(name, t) for t in self.target_modules)

    def unmatched_targets(self, names) -> list[str]:
        """The target_modules list entries that match none of ``names`` (empty for a regex or
        "all-linear")."""
        if self.all_linear or self._pattern is not None:
            return []
        names = list(names)
        return [t for t in self.target_modules if not any(_name_matches(n, t) for n in names)]

    def is_saved_module(self, name: str) -> bool:
        """Whether ``name`` is one of modules_to_save (matched like target_modules' names)."""
        return any(_name_matches(name, t) for t in self.modules_to_save or ())

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        return cls(**json.loads(text))


def _name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)
