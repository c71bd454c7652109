"""LLaCTR's self-supervised field fine-tuning: given a feature value, which of the K fields is it from?

    python -m embedding_jobs.field_finetune --dataset runs/data/ml-100k --out runs/models/ml-100k-fields

Pairs: for every field that owns a vocabulary (categorical and multi-categorical, not histories, which
reuse the item vocabulary), up to ``--values-per-field`` values seen in the **training split** (never
validation or test), their readable text as the prompt and the field as the answer. A value whose text
belongs to several fields is dropped (it has no single answer). A share of the values is held out to
measure field-classification accuracy before and after.

Loss: InfoNCE between the pooled, L2-normalised state of the query and those of all K field texts (the
field table's own texts, ``embedding_jobs.templates.field_texts``), temperature 0.02; LoRA (peft) on the
attention projections by default. The query is the value's text for an encoder (mean pooling); for a decoder
it is the reference code's instruction ("Which field does the value ... belong to? The fields are: ...
Answer:") and its state at the answer's position (the last token), while each field text is pooled at its
end-of-text token, as the embedding job pools it (``--prompt`` chooses). The merged model is saved in Hugging Face format with the sentence-transformers pooling files,
so ``python -m embedding_jobs.run --entity field --model OUT`` embeds the fields with it. ``report.json``
holds the accuracies, the pair counts and the time taken.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from embedding_jobs.engines import TextTokenizer, pool, right_padded
from embedding_jobs.model_files import (
    Pooling,
    default_pooling,
    packaged_minilm,
    read_model_config,
    resolve_model_path,
)
from embedding_jobs.prepared import PreparedData
from embedding_jobs.templates import display_name, field_texts
from recsys.atomic import atomic_dir
from recsys.data.schema import FIRST_ID, FieldKind
from recsys.device import compute_device

log = logging.getLogger(__name__)


@dataclass
class FieldTuneOptions:
    dataset: Path
    out: Path
    model: Path
    values_per_field: int = 1000
    holdout: float = 0.2  # share of each field's sampled values kept out of training, for accuracy
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 0.02
    lora: bool = True
    lora_rank: int = 8
    max_length: int = 32
    seed: int = 0
    time_budget_s: float | None = None  # stop training after this long (CPU machines)
    prompt: str = "auto"  # value: the value's text is the query; instruction: the reference's question; auto:
    #                       instruction for decoders (the state at the answer's position), value for encoders


INSTRUCTION = "Which field does the value \"{value}\" belong to? The fields are: {fields}. Answer with the field's name."


def instruction_prompts(values: list[str], field_names: list[str], tokenizer) -> list[str]:
    """LLaCTR's question for a decoder: the value and the candidate fields as a user turn, then the start of the
    assistant's turn (the tokenizer's chat template, where it has one), so the last token's state (the query) is
    where the model would begin to name the field."""
    fields = ", ".join(field_names)
    questions = [INSTRUCTION.format(value=v, fields=fields) for v in values]
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True) for q in questions]
    return [f"{q}\nAnswer:" for q in questions]


@dataclass
class Pairs:
    texts: list[str]
    labels: np.ndarray  # field position in schema order


def build_pairs(data: PreparedData, values_per_field: int, holdout: float, seed: int) -> tuple[Pairs, Pairs]:
    """(train, held-out) value->field pairs from the training split only."""
    rng = np.random.default_rng(seed)
    train = pq.read_table(data.folder / "train.parquet")
    by_text: dict[str, set[int]] = {}
    candidates: dict[int, list[str]] = {}
    for k, f in enumerate(data.schema.fields):
        if f.kind not in (FieldKind.CATEGORICAL, FieldKind.MULTI_CATEGORICAL) or f.table != f.name:
            continue
        col = train.column(f.name).combine_chunks()
        ids = col.flatten() if f.kind is FieldKind.MULTI_CATEGORICAL else col
        ids = np.unique(ids.to_numpy())
        ids = ids[ids >= FIRST_ID]
        if len(ids) > values_per_field:
            ids = rng.choice(ids, values_per_field, replace=False)
        texts = data.vocab_text(f)
        candidates[k] = [t for t in (texts[i].strip() for i in np.sort(ids)) if t]
        for t in candidates[k]:
            by_text.setdefault(t, set()).add(k)
    tr, ho = Pairs([], np.zeros(0, np.int64)), Pairs([], np.zeros(0, np.int64))
    tr_labels, ho_labels = [], []
    for k, texts in candidates.items():
        texts = [t for t in texts if len(by_text[t]) == 1]  # ambiguous values have no single answer
        order = rng.permutation(len(texts))
        n_hold = int(round(len(texts) * holdout))
        for rank, i in enumerate(order):
            pairs, labels = (ho, ho_labels) if rank < n_hold else (tr, tr_labels)
            pairs.texts.append(texts[i])
            labels.append(k)
    tr.labels, ho.labels = np.array(tr_labels, np.int64), np.array(ho_labels, np.int64)
    return tr, ho


class PooledEncoder:
    """A transformers model (LoRA-wrapped or not) and its tokenizer that give pooled text vectors, tokenized
    (:class:`~embedding_jobs.engines.TextTokenizer`: a decoder's texts end with its end-of-text token) and pooled
    as the embedding engines do. Shared by the field fine-tuning and ELEC's adaptation (ctr_adapt)."""

    def __init__(self, folder: Path, max_length: int, lora_rank: int | None, *, pooling: Pooling | None = None,
                 normalize: bool = True, trust_remote_code: bool = False) -> None:
        from transformers import AutoModel

        self.folder = folder
        config = read_model_config(folder)
        self.pooling: Pooling = pooling or default_pooling(config)
        self.text_tokenizer = TextTokenizer(folder, max_length, trust_remote_code,
                                            end_token=self.pooling is Pooling.LAST and config.is_decoder)
        self.tokenizer = self.text_tokenizer.tokenizer
        self.model = AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=torch.float32,
                                               local_files_only=True)
        self.is_decoder = config.is_decoder
        self.normalize = normalize
        self.max_length = max_length
        if lora_rank:
            from peft import LoraConfig, get_peft_model

            targets = [n for n in ("query", "key", "value", "q_proj", "k_proj", "v_proj", "dense", "o_proj")
                       if any(name.endswith(n) for name, _ in self.model.named_modules())]
            self.model = get_peft_model(self.model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                               lora_dropout=0.0, target_modules=targets))
        # the language model runs on the GPU where there is one; the pooled vectors come back to the CPU, where
        # the small heads and losses of both callers live (autograd follows the copy)
        self.device = compute_device()
        self.model.to(self.device)

    def encode(self, texts: list[str], end: bool = True) -> torch.Tensor:
        """Pooled states; ``end=False``: a decoder's prompt without the end token (its last state answers)."""
        ids, _ = self.text_tokenizer.encode(texts, end=end)
        input_ids, mask = right_padded(ids, self.text_tokenizer.pad_id)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return pool(hidden, mask, self.pooling, self.normalize).cpu()

    @torch.no_grad()
    def accuracy(self, pairs: Pairs, fields: list[str], batch_size: int = 256, query_end: bool = True) -> float:
        self.model.eval()
        keys = self.encode(fields)
        hits = 0
        for s in range(0, len(pairs.texts), batch_size):
            pred = (self.encode(pairs.texts[s:s + batch_size], end=query_end) @ keys.T).argmax(-1).numpy()
            hits += int((pred == pairs.labels[s:s + batch_size]).sum())
        return hits / max(len(pairs.texts), 1)

    def save(self, out: Path) -> None:
        model = self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model
        model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        # keep the sentence-transformers description (pooling, max length), so every engine pools the same
        for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
            if (self.folder / name).is_file():
                shutil.copy2(self.folder / name, out / name)
        for sub in self.folder.iterdir():
            if sub.is_dir() and sub.name.endswith("_Pooling"):
                shutil.copytree(sub, out / sub.name, dirs_exist_ok=True)


def finetune(opts: FieldTuneOptions, progress: bool = True) -> dict:
    torch.manual_seed(opts.seed)
    data = PreparedData.open(opts.dataset)
    fields = field_texts(data).texts
    train, held = build_pairs(data, opts.values_per_field, opts.holdout, opts.seed)
    if not train.texts or not held.texts:
        raise ValueError(f"{opts.dataset}: no field has training values to build pairs from")
    log.info("%d training pairs and %d held-out pairs over %d fields", len(train.texts), len(held.texts),
             len(set(train.labels.tolist())))
    folder = resolve_model_path(opts.model)
    prompt = opts.prompt if opts.prompt != "auto" else ("instruction" if read_model_config(folder).is_decoder
                                                        else "value")
    if prompt not in ("value", "instruction"):
        raise ValueError(f"prompt {opts.prompt!r}: choose auto, value or instruction")
    # the question lists every field, so it is far longer than a value
    enc = PooledEncoder(folder, max(opts.max_length, 256) if prompt == "instruction" else opts.max_length,
                        opts.lora_rank if opts.lora else None)
    query_end = prompt == "value"  # an instruction's last state is the answer's position: no end token after it
    if prompt == "instruction":
        names = [display_name(f.name) for f in data.schema.fields]
        train = Pairs(instruction_prompts(train.texts, names, enc.tokenizer), train.labels)
        held = Pairs(instruction_prompts(held.texts, names, enc.tokenizer), held.labels)
    log.info("queries: %s (%s pooling), e.g. %r", prompt, enc.pooling, train.texts[0])
    before = enc.accuracy(held, fields, query_end=query_end)
    log.info("held-out field accuracy before fine-tuning: %.3f (chance %.3f)", before, 1 / len(fields))
    params = [p for p in enc.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr)
    rng = np.random.default_rng(opts.seed)
    start, steps, stopped = time.perf_counter(), 0, False
    labels = torch.from_numpy(train.labels)
    for epoch in range(opts.epochs):
        enc.model.train()
        order = rng.permutation(len(train.texts))
        bar = tqdm(range(0, len(order), opts.batch_size), desc=f"field fine-tuning {epoch + 1}/{opts.epochs}",
                   disable=not progress, unit="batch")
        for s in bar:
            idx = order[s:s + opts.batch_size]
            queries = enc.encode([train.texts[i] for i in idx], end=query_end)
            keys = enc.encode(fields)
            loss = F.cross_entropy(queries @ keys.T / opts.temperature, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if opts.time_budget_s and time.perf_counter() - start > opts.time_budget_s:
                stopped = True
                break
        if stopped:
            log.info("time budget of %.0f s reached after %d steps", opts.time_budget_s, steps)
            break
    train_s = time.perf_counter() - start
    after = enc.accuracy(held, fields, query_end=query_end)
    log.info("held-out field accuracy after fine-tuning: %.3f (before %.3f)", after, before)
    report = {"accuracy_before": before, "accuracy_after": after, "chance": 1 / len(fields),
              "train_pairs": len(train.texts), "heldout_pairs": len(held.texts), "steps": steps,
              "train_seconds": train_s, "stopped_by_time_budget": stopped, "prompt": prompt,
              "pooling": str(enc.pooling), "model": str(folder), "dataset_fingerprint":
              data.schema.fingerprint, "options": {k: str(v) for k, v in asdict(opts).items()}}
    with atomic_dir(opts.out) as tmp:  # a crash leaves the previous folder or the new one, never half of one
        enc.save(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedding_jobs.field_finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, required=True, help="a prepared dataset folder")
    p.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned (merged) model")
    p.add_argument("--model", type=Path, default=None, help="local model folder (default: the packaged MiniLM)")
    d = FieldTuneOptions(Path(), Path(), Path())
    p.add_argument("--values-per-field", type=int, default=d.values_per_field)
    p.add_argument("--holdout", type=float, default=d.holdout)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--time-budget-s", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--prompt", choices=["auto", "value", "instruction"], default=d.prompt,
                   help="the query: the value's text, or the reference's question listing the fields (auto: the "
                        "question for decoders, the value for encoders)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    opts = FieldTuneOptions(dataset=a.dataset, out=a.out, model=a.model or packaged_minilm(),
                            values_per_field=a.values_per_field, holdout=a.holdout, epochs=a.epochs,
                            batch_size=a.batch_size, lr=a.lr, temperature=a.temperature, lora=not a.full,
                            lora_rank=a.lora_rank, seed=a.seed, time_budget_s=a.time_budget_s, prompt=a.prompt)
    report = finetune(opts, progress=not a.no_progress)
    print(f"field accuracy on held-out values: {report['accuracy_before']:.3f} -> {report['accuracy_after']:.3f} "
          f"(chance {report['chance']:.3f}); {report['steps']} steps in {report['train_seconds']:.0f}s; "
          f"model saved to {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
