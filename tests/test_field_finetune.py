"""LLaCTR's field fine-tuning: the pairs come from training values only and cover every field; a tiny
model's field-classification accuracy rises above chance."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embedding_jobs.field_finetune import FieldTuneOptions, build_pairs, finetune
from embedding_jobs.model_files import packaged_minilm
from embedding_jobs.prepared import PreparedData
from recsys.data.prepare import prepare
from recsys.data.schema import FIRST_ID, FieldKind, load_schema


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "ml-100k"
    prepare(load_schema("ml-100k"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer, saved locally (no hub)."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(packaged_minilm() / name, folder / name)
    return folder


def _split_values(data: PreparedData, split: str, name: str) -> set[str]:
    f = data.schema.field(name)
    col = pq.read_table(data.folder / f"{split}.parquet", columns=[name]).column(name).combine_chunks()
    ids = (col.flatten() if f.kind is FieldKind.MULTI_CATEGORICAL else col).to_numpy()
    texts = data.vocab_text(f)
    return {texts[i] for i in np.unique(ids) if i >= FIRST_ID}


def test_pairs_cover_every_field_and_use_training_values_only(ml100k):
    data = PreparedData.open(ml100k)
    train, held = build_pairs(data, values_per_field=50, holdout=0.2, seed=0)
    names = [f.name for f in data.schema.fields]
    eligible = {k for k, f in enumerate(data.schema.fields)
                if f.kind in (FieldKind.CATEGORICAL, FieldKind.MULTI_CATEGORICAL) and f.table == f.name}
    assert set(train.labels.tolist()) == eligible  # every field with its own vocabulary
    assert not set(train.texts) & set(held.texts)
    for pairs in (train, held):
        for text, k in zip(pairs.texts, pairs.labels.tolist(), strict=True):
            assert text in _split_values(data, "train", names[k]), (names[k], text)
    assert max(np.bincount(train.labels)) <= 50


def test_finetuning_a_tiny_model_beats_chance(ml100k, tiny_bert, tmp_path):
    opts = FieldTuneOptions(dataset=ml100k, out=tmp_path / "model", model=tiny_bert, values_per_field=60,
                            epochs=4, batch_size=32, lr=3e-3, lora=False, max_length=16, seed=0)
    report = finetune(opts, progress=False)
    assert report["accuracy_after"] > 2 * report["chance"]
    assert report["accuracy_after"] > report["accuracy_before"]
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "report.json").is_file()


def test_a_decoder_learns_from_the_instruction_at_the_answers_position(ml100k, tmp_path):
    """A decoder's query is the reference's question (every field listed), its state where the answer begins;
    the field texts are pooled at their end token, as the embedding job pools them; LoRA on the attention."""
    from embedding_jobs.engines import EngineOptions, TransformersEngine
    from embedding_jobs.materialize import materialize
    from embedding_jobs.templates import field_texts
    from embedding_jobs.tiny_models import save_tiny_gguf

    data = PreparedData.open(ml100k)
    corpus = [*field_texts(data).texts, "Which field does the value belong to? The fields are: Answer with"] * 30
    materialize(save_tiny_gguf(tmp_path / "tiny.gguf", corpus), tmp_path / "decoder")
    opts = FieldTuneOptions(dataset=ml100k, out=tmp_path / "model", model=tmp_path / "decoder", values_per_field=30, epochs=3,
                            batch_size=32, lr=3e-3, lora_rank=8, seed=0)
    report = finetune(opts, progress=False)
    assert report["prompt"] == "instruction" and report["pooling"] == "last"
    assert report["accuracy_after"] > report["accuracy_before"]
    engine = TransformersEngine(EngineOptions(model=tmp_path / "model"))  # the merged model embeds the fields
    assert engine.info.end_token and engine.embed(field_texts(data).texts[:3]).shape == (3, 128)
