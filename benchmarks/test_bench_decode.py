"""Eager decode: greedy generation of a tiny LLaMA with every projection adapted, per token.

Model: transformers.LlamaForCausalLM built from a LlamaConfig (hidden 256, 4 layers, 4 heads,
intermediate 688, vocab 512; no download), fp32, one thread. Each generate call: PROMPT = 8
prompt tokens, NEW = 32 new tokens (min_new_tokens = max_new_tokens, so every provider
generates the same number), greedy, use_cache=True; reported as the call's time / NEW per
generated token (the 8-token prefill included). All seven projections (q, k, v, o, gate, up,
down) adapted. At this size a token's arithmetic is tiny, so what is compared is mostly the host
time each adapted layer adds to the base model's: the eager-decode cost of issue 12.

Group "decode batch 4" (providers, interleaved round by round in one process):
  base              the model without adapters
  svk-<method>      svk.inject(AdapterConfig(method, ...)) for each of the seven methods;
                    rank 16 for lora_xs, lora, kasa, pissa; the papers' defaults for sara
                    (tau 0.01), mosara (tau 0.5, 5 heads) and siva (perc 0.95), whose ranks
                    follow the weights' spectra (the label gives the mean rank)
  peft-lora         PEFT LoraConfig(r=16, lora_alpha=16) on the same base
  bank-r1           svk.AdapterBank (LoRA-XS r 16) holding 1 adapter; every row uses it
  bank-r10000       AdapterBank holding 10 000 adapters; 4 distinct users spread over it
Group "decode batch 64": base, bank-r1 and bank-r10000 with 64 distinct users (one per row).
"""
import copy
import os

import pytest
import torch

import svk
from benchmarks.utils import CPU_FAMILY, as_result, environment, interleaved, one_thread  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT, NEW, RANK = 8, 32, 16
RESIDENT = [1, 10_000]
ROUNDS = int(os.environ.get("SVK_BENCH_DECODE_ROUNDS", "7"))
METHODS = {"lora_xs": dict(rank=RANK), "sara": {}, "mosara": {}, "kasa": dict(rank=RANK),
           "siva": {}, "lora": dict(rank=RANK), "pissa": dict(rank=RANK)}
DEVICE = torch.device("cpu")
pytestmark = CPU_FAMILY


@pytest.fixture(scope="module")
def base_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).eval()


@pytest.fixture(scope="module")
def banks(base_model):
    """resident -> (model, bank): a LoRA-XS bank with `resident` adapters added by name."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for resident in RESIDENT:
        model = copy.deepcopy(base_model)
        bank = svk.AdapterBank(model, svk.AdapterConfig(method="lora_xs", rank=RANK,
                                                        target_modules=TARGETS),
                               capacity=resident, progress=False)
        for k in range(resident):
            bank.add(f"user{k}", {f"{name}.core": torch.randn(RANK, RANK, generator=g) * 0.1
                                  for name in bank.layers})
        out[resident] = (model, bank)
    return out


def _generate(model, prompt):
    def run():
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 use_cache=True, pad_token_id=0)
        if out.shape != (prompt.shape[0], PROMPT + NEW):
            raise AssertionError(f"generate returned {tuple(out.shape)}")
        return out
    return run


def _banked(model, bank, ids, prompt):
    generate = _generate(model, prompt)

    def run():
        with bank.activate(ids):
            return generate()
    return run


def _user_ids(users, resident):
    """`users` distinct slots spread over the bank (all slot 0 when it holds one adapter)."""
    if resident == 1:
        return [0] * users
    step = resident // users
    return [k * step for k in range(users)]


def _time(svk_results, group, batch, fns, labels, info):
    times = interleaved(fns, calls=1, rounds=ROUNDS, warmup=1)
    for provider, seconds in times.items():
        svk_results.append(as_result(
            f"test_decode[{group}-{provider}]", group, [s / NEW for s in seconds],
            provider=provider, label=labels[provider], family="decode", batch=batch,
            short=f"decode b{batch}",
            prompt_tokens=PROMPT, new_tokens=NEW, unit="per generated token",
            **info.get(provider, {}), **MODEL, **environment(DEVICE)))


def test_decode_batch4(svk_results, base_model, banks):
    from svk.integrations import adapted_layers
    batch = 4
    prompt = torch.randint(0, MODEL["vocab_size"], (batch, PROMPT),
                           generator=torch.Generator().manual_seed(0))
    fns, labels, info = {"base": _generate(base_model, prompt)}, {"base": "base"}, {}
    for method, hparams in METHODS.items():
        model = copy.deepcopy(base_model)
        svk.inject(model, svk.AdapterConfig(method=method, target_modules=TARGETS, **hparams),
                   progress=False)
        ranks = [layer.rank for layer in adapted_layers(model).values()]
        if len(ranks) != 7 * MODEL["num_hidden_layers"]:
            raise AssertionError(f"{method}: {len(ranks)} adapted layers, expected 28")
        mean = sum(ranks) / len(ranks)
        provider = f"svk-{method}"
        fns[provider] = _generate(model, prompt)
        labels[provider] = f"svk {method} r{'' if 'rank' in hparams else '≈'}{mean:.0f}"
        info[provider] = dict(method=method, mean_rank=mean)
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(
        r=RANK, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)).eval()
    fns["peft-lora"], labels["peft-lora"] = _generate(peft_model, prompt), f"PEFT LoRA r{RANK}"
    info["peft-lora"] = dict(peft=peft.__version__)
    _add_banks(fns, labels, info, banks, batch, prompt)
    _time(svk_results, f"decode batch {batch}, {MODEL['num_hidden_layers']} layers, hidden "
                       f"{MODEL['hidden_size']}, 7 projections adapted", batch, fns, labels,
          info)


def test_decode_batch64(svk_results, base_model, banks):
    batch = 64
    prompt = torch.randint(0, MODEL["vocab_size"], (batch, PROMPT),
                           generator=torch.Generator().manual_seed(0))
    fns, labels, info = {"base": _generate(base_model, prompt)}, {"base": "base"}, {}
    _add_banks(fns, labels, info, banks, batch, prompt)
    _time(svk_results, f"decode batch {batch}, {MODEL['num_hidden_layers']} layers, hidden "
                       f"{MODEL['hidden_size']}, 7 projections adapted", batch, fns, labels,
          info)


def _add_banks(fns, labels, info, banks, batch, prompt):
    for resident, (model, bank) in banks.items():
        ids = _user_ids(batch, resident)
        provider = f"bank-r{resident}"
        fns[provider] = _banked(model, bank, ids, prompt)
        distinct = len(set(ids))
        labels[provider] = (f"bank LoRA-XS r{RANK}: {distinct} of {resident} resident"
                            if distinct > 1 else f"bank LoRA-XS r{RANK}: 1 resident, every row")
        info[provider] = dict(users=batch, distinct=distinct, resident=resident)
