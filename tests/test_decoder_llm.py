"""A real decoder on the language-model path: a GGUF file materialised into a Hugging Face folder (a tiny
Llama the test writes with the ``gguf`` package, and, marked slow, the packaged SmolLM2-135M-Instruct), and
last-token pooling that really pools each text's own last token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedding_jobs.engines import EngineOptions, TransformersEngine, VLLMOptions
from embedding_jobs.materialize import MANIFEST, materialize, packaged_gguf
from embedding_jobs.model_files import ModelError, Pooling
from embedding_jobs.tiny_models import save_tiny_gguf

CORPUS = ["The movie's title is Heat. Genres: Action, Crime, Thriller.",
          "The user is a 25 year old programmer from zip code 55455.", "Toy Story (1995) is an Animation."] * 40
TEXTS = ["Heat.", "The movie's title is Toy Story. Genres: Animation, Children's, Comedy.", "A programmer."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny GGUF file, and its materialised folder."""
    root = tmp_path_factory.mktemp("gguf")
    gguf = save_tiny_gguf(root / "tiny.gguf", CORPUS)
    materialize(gguf, root / "hf")
    return gguf, root / "hf"


def test_the_materialised_folder_is_the_model_in_the_gguf_file(tiny):
    """Same logits as the model the file was written from (so llama.cpp's q/k order is undone), the tied output
    layer tied (generation equals generation from the GGUF file), and nothing quantised left in the config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, folder = tiny
    reference = AutoModelForCausalLM.from_pretrained(f"{gguf}.hf").eval()
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(TEXTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, reference(ids).logits, atol=1e-5)
        generated = loaded.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, from_gguf.generate(ids, max_new_tokens=6, do_sample=False))
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_materialising_is_deterministic_and_a_rerun_does_nothing(tiny, tmp_path):
    gguf, folder = tiny
    manifest = json.loads((folder / MANIFEST).read_text())
    again = materialize(gguf, tmp_path / "again")
    assert again["content_sha256"] == manifest["content_sha256"]  # byte-identical files
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    assert materialize(gguf, folder)["content_sha256"] == manifest["content_sha256"]
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before  # nothing rewritten
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")  # damaged: written again
    materialize(gguf, folder)
    assert json.loads((folder / MANIFEST).read_text())["content_sha256"] == manifest["content_sha256"]


def test_a_truncated_gguf_is_refused_and_nothing_is_written(tiny, tmp_path):
    gguf, _ = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated or altered"):
        materialize(cut, tmp_path / "a", expected_sha256="0" * 64)
    with pytest.raises(ModelError, match=r"cut.gguf: cannot be read as a GGUF language model"):
        materialize(cut, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cut.gguf"]  # no temporary folder left either


def test_last_token_pooling_pools_each_texts_end_token(tiny):
    """In a batch of unequal lengths (right-padded) each vector is the decoder's state at that text's own
    end-of-text token: the same as the text embedded alone, and as the state computed by hand."""
    from transformers import AutoModel, AutoTokenizer

    _, folder = tiny
    engine = TransformersEngine(EngineOptions(model=folder, normalize=False))
    assert engine.info.pooling is Pooling.LAST and engine.info.end_token
    together = engine.embed(TEXTS)
    alone = np.concatenate([engine.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    for text, vector in zip(TEXTS, together, strict=True):
        ids = tokenizer(text).input_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            state = model(torch.tensor([ids])).last_hidden_state[0, -1]
        np.testing.assert_allclose(vector, state.numpy(), atol=1e-5)


def test_a_truncated_text_keeps_its_end_token(tiny):
    _, folder = tiny
    engine = TransformersEngine(EngineOptions(model=folder, max_length=4))
    ids, cut = engine._tokenizer.encode([TEXTS[1], "Heat."])
    assert cut == 1 and len(ids[0]) == 4 and ids[0][-1] == ids[1][-1] == engine._tokenizer.end_id


def test_a_decoder_without_an_end_token_or_an_encoder_decoder_is_refused(tiny, tmp_path):
    _, folder = tiny
    broken = tmp_path / "no_eos"
    shutil.copytree(folder, broken)
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (broken / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no end-of-text token"):
        TransformersEngine(EngineOptions(model=broken))
    config = json.loads((folder / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "t5", "is_encoder_decoder": True}))
    with pytest.raises(ModelError, match="encoder-decoder"):
        TransformersEngine(EngineOptions(model=broken))


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_pools_the_same_last_token(tiny):
    pytest.importorskip("vllm")
    from embedding_jobs.engines import VLLMEngine

    _, folder = tiny
    options = EngineOptions(model=folder, normalize=False)
    expected = TransformersEngine(options).embed(TEXTS)
    engine = VLLMEngine(options, VLLMOptions(gpu_memory_utilization=0.1))
    try:
        got = engine.embed(TEXTS)
    finally:
        engine.close()
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.999, cos


@pytest.mark.slow
def test_the_packaged_smollm2_materialises_and_embeds(tmp_path):
    """The real 93 MB packaged decoder: its hash checks, it loads, and it embeds two texts (576-d)."""
    gguf, sha = packaged_gguf("smollm2")
    manifest = materialize(gguf, tmp_path / "smollm2", sha)
    assert manifest["model_type"] == "llama" and manifest["tied_lm_head"] and manifest["parameters"] > 134e6
    vectors = TransformersEngine(EngineOptions(model=tmp_path / "smollm2")).embed(["Heat (1995)", "Toy Story (1995)"])
    assert vectors.shape == (2, 576) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)
