"""transformers.Trainer integration: an svk adapter file in every checkpoint.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[svk.integrations.AdapterCheckpointCallback()])
    trainer.train()
    # every output_dir/checkpoint-N/ now also holds svk_adapter.safetensors

Resuming:
  - bit for bit, optimizer and schedule included: inject the same AdapterConfig into the same
    base model and call ``trainer.train(resume_from_checkpoint="out/checkpoint-N")``. Trainer
    reloads its own model file: an injected model's state_dict stores every svk layer so that
    it loads back exactly (see svk/integrations/_state_dict.py).
  - from the adapter file alone (a small file, e.g. with save_only_model or after the model
    file was pruned): inject the same config into the base model, then
    ``AdapterCheckpointCallback.load(model, "out/checkpoint-N")``.

Trainer's model file is not a plain model: while unmerged, each adapted layer's base weight is
stored with a leading unit dimension, so that ``AutoModel*.from_pretrained(checkpoint)`` stops
with a size mismatch naming the layer instead of silently loading a base without its adapter
(or, for KaSA/PiSSA, a rewritten base). For a plain model use ``svk.unload(model, merge=True)``
and ``save_pretrained`` (or the adapter file with the base model).
"""
from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from svk.integrations.adapter_io import load_adapter, save_adapter

ADAPTER_FILENAME = "svk_adapter.safetensors"


class AdapterCheckpointCallback(TrainerCallback):
    """Writes ``svk.save_adapter(model, <checkpoint>/<filename>)`` on every Trainer save, from
    the main process (under FSDP2 every rank takes part, as save_adapter requires). Raises
    (stopping training) if the checkpoint directory Trainer should have written is missing or
    the save fails: a checkpoint without its adapter is not silently skipped.

    filename: the adapter file's name inside each checkpoint directory.
    include_frozen: passed to save_adapter.
    """

    def __init__(self, filename: str = ADAPTER_FILENAME, *, include_frozen: bool = False):
        if not isinstance(filename, str) or not filename or os.sep in filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.filename = filename
        self.include_frozen = include_frozen

    def checkpoint_dir(self, args, state) -> str:
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("AdapterCheckpointCallback.on_save: Trainer passed no model")
        # Under FSDP2 (DTensor parameters) save_adapter is collective: every rank calls it and
        # rank 0 writes. Otherwise (one process, DDP) only the main process writes.
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        if not sharded and not state.is_world_process_zero:
            return control
        directory = self.checkpoint_dir(args, state)
        if state.is_world_process_zero and not os.path.isdir(directory):
            raise FileNotFoundError(f"AdapterCheckpointCallback: the checkpoint directory "
                                    f"{directory!r} does not exist; the adapter was not saved")
        save_adapter(model, os.path.join(directory, self.filename),
                     include_frozen=self.include_frozen)
        return control

    @staticmethod
    def load(model, checkpoint_dir: str | os.PathLike,
             filename: str = ADAPTER_FILENAME) -> None:
        """Loads a checkpoint's adapter file into a model injected with the same config."""
        path = os.path.join(os.fspath(checkpoint_dir), filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no svk adapter file {path!r}: was the checkpoint written "
                                    "with AdapterCheckpointCallback?")
        load_adapter(model, path)
