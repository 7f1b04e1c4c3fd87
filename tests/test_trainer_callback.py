"""transformers.Trainer with svk: the adapter file in every checkpoint, exact resumption, and a
Trainer model file that a plain from_pretrained refuses instead of misreading (issue 15.7)."""
import os

import pytest
import torch

from svk.integrations import (AdapterConfig, AdapterCheckpointCallback, adapted_layers, inject,
                              merge)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _data(n=8, length=8):
    ids = torch.randint(1, 97, (n, length), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(model, out, *, max_steps, resume=None):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=1, save_strategy="steps",
        per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1000, report_to=[],
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                   callbacks=[AdapterCheckpointCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return model.eval()


def _ids():
    return torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(5))


PISSA = AdapterConfig(method="pissa", rank=2, target_modules=["q_proj", "v_proj"])


def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    model = _llama()
    inject(model, PISSA, progress=False)
    _train(model, tmp_path, max_steps=2)
    ids = _ids()
    with torch.no_grad():
        trained = model(ids).logits
    assert os.path.isfile(tmp_path / "checkpoint-1" / "svk_adapter.safetensors")

    # from the adapter file alone
    fresh = _llama()
    inject(fresh, PISSA, progress=False)
    AdapterCheckpointCallback.load(fresh, tmp_path / "checkpoint-2")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, trained)

    # Trainer's own resumption from checkpoint-1 (its model file, optimizer, RNG): step 2
    # again, bit for bit
    again = _llama()
    inject(again, PISSA, progress=False)
    _train(again, tmp_path / "resumed", max_steps=2, resume=str(tmp_path / "checkpoint-1"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, trained)

    with pytest.raises(FileNotFoundError, match="AdapterCheckpointCallback"):
        AdapterCheckpointCallback.load(fresh, tmp_path)


@pytest.mark.parametrize("build, cfg", [
    (_llama, PISSA),
    # GPT-2's square attn.c_proj: before, its transposed weight loaded silently
    (_gpt2, AdapterConfig(method="lora", rank=2, target_modules=["attn.c_proj"]))])
def test_plain_from_pretrained_of_an_unmerged_model_file_fails_loudly(build, cfg, tmp_path):
    model = build()
    inject(model, cfg, progress=False)
    model.save_pretrained(tmp_path)          # what Trainer writes as the checkpoint's model
    # transformers 5 logs a load report (the (1, out, in) MISMATCH rows and the UNEXPECTED svk
    # keys) and then raises; ignore_mismatched_sizes=True would be the user's explicit choice.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(model).from_pretrained(tmp_path)


@pytest.mark.parametrize("build, cfg", [
    (_llama, PISSA),
    (_gpt2, AdapterConfig(method="lora", rank=2, target_modules=["c_attn", "attn.c_proj"]))])
def test_plain_from_pretrained_of_a_merged_model_file_is_the_fine_tuned_model(build, cfg,
                                                                              tmp_path):
    model = build().eval()
    inject(model, cfg, progress=False)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for tensor in layer.adapter_tensors().values():
                if tensor.requires_grad:
                    tensor.add_(0.1 * torch.randn_like(tensor))
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    merge(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        # fp32 merge: one rounding of W + ΔW per element (≈ 6e-8 relative) and a GEMM that
        # rounds differently from base GEMM + low-rank path.
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
