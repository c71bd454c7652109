"""The language-model side: templates, engines (transformers and vLLM), the job CLI and its crash recovery.

Models are the packaged pretrained MiniLM and tiny random models the tests save themselves (no hub).
vLLM starts twice in this module (about 20-40 s each on 2 cores): deselect with ``-m "not vllm"``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embedding_jobs.engines import EngineOptions, TransformersEngine, VLLMOptions, check_texts, describe_model
from embedding_jobs.model_files import ModelError, Pooling, packaged_minilm
from embedding_jobs.prepared import PreparedData
from embedding_jobs.run import main
from embedding_jobs.templates import (
    TemplateOptions,
    build_texts,
    feature_texts,
    field_texts,
    item_texts,
    template_hash,
    user_texts,
)
from embedding_jobs.tiny_models import save_tiny_decoder, save_tiny_encoder
from recsys.features import FeatureEntity, load_feature_table

REPO = Path(__file__).resolve().parents[1]


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    from recsys.data.prepare import prepare
    from recsys.data.schema import load_schema

    out = tmp_path_factory.mktemp("ml100k") / "prepared"
    prepare(load_schema("ml-100k"), out, progress=False)
    return PreparedData.open(out)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT (hidden 64) with MiniLM's tokenizer: fast enough to embed thousands of texts."""
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory, ml100k: PreparedData) -> Path:
    """A random Qwen2 decoder (2 layers, hidden 128, heads of 64) with a BPE tokenizer trained on ML-100K texts."""
    corpus = [t for e in (FeatureEntity.ITEM, FeatureEntity.USER)
              for t in build_texts(ml100k, e, TemplateOptions())[0].texts]
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), corpus)


@pytest.fixture(scope="module")
def minilm() -> TransformersEngine:
    return TransformersEngine(EngineOptions(model=packaged_minilm()))


@pytest.fixture
def quiet_cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sets these with setdefault; set them here so they are undone after the test."""
    for name, value in (("VLLM_LOGGING_LEVEL", "WARNING"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- templates ---------------------------------------------------------------------------------------------


def test_field_and_feature_texts_align_with_schema_and_vocabularies(ml100k: PreparedData) -> None:
    fields = field_texts(ml100k)
    names = [f.name for f in ml100k.schema.fields]
    assert fields.keys.tolist() == list(range(len(names))) and fields.num_rows == len(names)
    assert fields.texts[names.index("genres")] == "genres: the movie's genres."

    tables = {t.table: t for t in feature_texts(ml100k)}
    # every field owning a vocabulary gets a table; fields sharing one (hist_item_id -> item_id) do not
    assert set(tables) == {f.name for f in ml100k.schema.fields if f.vocab_file and f.table == f.name}
    genres = ml100k.field("genres")
    values = pq.read_table(ml100k.folder / genres.vocab_file).column("value").to_pylist()
    table = tables["genres"]
    assert table.num_rows == genres.vocab_size and table.keys.tolist() == list(range(2, genres.vocab_size))
    for key, text in zip(table.keys, table.texts, strict=True):
        assert text == f"The movie's genres is {values[key]}."


def test_item_texts_hold_every_item_side_field(ml100k: PreparedData) -> None:
    items = item_texts(ml100k, TemplateOptions())
    item_vocab = ml100k.vocab_text(ml100k.field("item_id"))
    key = item_vocab.index("50")  # Star Wars in MovieLens-100K
    text = items.texts[list(items.keys).index(key)]
    assert text == ("The movie's id is 50. The movie's title is Star Wars. The movie's release year is 1977. "
                    "The movie's genres is Action, Adventure, Romance, Sci-Fi, War.")
    assert len(items.keys) == ml100k.field("item_id").vocab_size - 2


def test_user_texts_use_only_training_interactions(ml100k: PreparedData) -> None:
    """Rebuilt independently from train.parquet: each user's history is exactly their N latest training
    ratings, newest first, so no validation or test interaction can be in it."""
    n = 5
    users = user_texts(ml100k, TemplateOptions(history_length=n).resolve(ml100k))
    titles = ml100k.vocab_text(ml100k.field("title"))
    train = pq.read_table(ml100k.folder / "train.parquet", columns=["user_id", "title", "rating", "timestamp"])
    df = train.to_pandas().reset_index().sort_values(["user_id", "timestamp", "index"], kind="stable")
    expected = {u: [f"{titles[t]} (rated {r:g})" for t, r in zip(g.title[-n:][::-1], g.rating[-n:][::-1],
                                                                  strict=True)]
                for u, g in df.groupby("user_id")}
    held_out = pq.read_table(ml100k.folder / "test.parquet", columns=["user_id", "title"]).to_pandas()
    leaked_candidates = 0
    for key, text in zip(users.keys, users.texts, strict=True):
        match = re.search(r"Recently rated, most recent first: (.*)\.$", text)
        history = match.group(1).split("; ") if match else []
        assert history == expected.get(int(key), []), f"user {key}: {text}"
        # titles this user rated only in the test split never appear in their text
        test_only = {titles[t] for t in held_out.title[held_out.user_id == key]} - {
            titles[t] for t in df.title[df.user_id == key]}
        leaked_candidates += len(test_only)
        assert not any(h.rsplit(" (rated", 1)[0] in test_only for h in history)
    assert leaked_candidates > 100  # the check above had plenty to catch


def test_user_texts_without_a_title_field_name_items_by_id(tiny_prepared) -> None:
    _, folder, _ = tiny_prepared
    data = PreparedData.open(folder)
    options = TemplateOptions(history_length=2).resolve(data)
    assert options.history_item_field == "item_id"
    table = user_texts(data, options)
    assert any(re.search(r"most recent first: i\d \(rated \d\); i\d \(rated \d\)\.$", t) for t in table.texts)
    # without outcomes (ELEC's adaptation): the same items, and no rating anywhere
    plain = user_texts(data, replace(options, history_outcomes=False))
    assert not any("rated" in t for t in plain.texts)
    assert any(re.search(r"Recently watched, most recent first: i\d; i\d\.$", t) for t in plain.texts)
    # history length 0: the profile only, so no text depends on a training row
    profile = user_texts(data, replace(options, history_length=0))
    assert not any("Recently" in t for t in profile.texts)
    assert [t.split(" Recently")[0] for t in table.texts] == profile.texts


def test_template_hash_follows_the_options_that_shape_the_texts() -> None:
    a, b = TemplateOptions(history_length=5), TemplateOptions(history_length=6)
    assert template_hash(FeatureEntity.USER, a) != template_hash(FeatureEntity.USER, b)
    assert template_hash(FeatureEntity.ITEM, a) == template_hash(FeatureEntity.ITEM, b)


# --- engines -----------------------------------------------------------------------------------------------


def test_minilm_places_animation_nearer_childrens_than_film_noir(ml100k: PreparedData,
                                                                 minilm: TransformersEngine) -> None:
    """Semantic sanity with the real pretrained model. Every genre text shares the template ("The movie's
    genres is ..."), whose common direction dominates raw cosine, so the comparison is made after removing
    the table's mean vector (a learned projection downstream ignores a shared offset in the same way)."""
    table = next(t for t in feature_texts(ml100k) if t.table == "genres")
    values = ml100k.vocab_text(ml100k.field("genres"))
    vectors = torch.from_numpy(minilm.embed(table.texts))
    centered = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=1)
    row = {values[k]: i for i, k in enumerate(table.keys)}

    def cos(a: str, b: str) -> float:
        return float(centered[row[a]] @ centered[row[b]])

    assert cos("Animation", "Children's") > cos("Animation", "Film-Noir") + 0.05


def test_model_paths_must_be_local_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           quiet_cli_env: None) -> None:
    with pytest.raises(ModelError, match="looks like a Hugging Face hub name, but this machine is offline"):
        describe_model(EngineOptions(model=Path("sentence-transformers/all-MiniLM-L6-v2")), "transformers")
    with pytest.raises(ModelError, match=r"model folder .*nowhere does not exist .*offline"):
        describe_model(EngineOptions(model=tmp_path / "nowhere"), "transformers")
    with pytest.raises(ModelError, match="no config.json"):
        describe_model(EngineOptions(model=tmp_path), "transformers")
    code = main(["--entity", "field", "--dataset", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--engine", "transformers", "--model", "Qwen/Qwen2-0.5B"])
    assert code == 2 and "this machine is offline" in caplog.text


def test_empty_text_and_truncation(tiny_bert: Path) -> None:
    engine = TransformersEngine(EngineOptions(model=tiny_bert, max_length=8))
    with pytest.raises(ValueError, match="text 1 is empty"):
        engine.embed(["fine", "   "])
    with pytest.raises(ValueError, match="text 0 is empty"):
        check_texts([""])
    vectors = engine.embed(["short", "a much longer text that needs more than eight tokens for sure"])
    assert engine.num_truncated == 1 and vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert describe_model(EngineOptions(model=tiny_bert), "transformers").pooling is Pooling.MEAN


def test_batching_does_not_change_vectors(tiny_bert: Path) -> None:
    texts = ["one", "two words", "three words here", "and a rather longer fourth text"]
    one = TransformersEngine(EngineOptions(model=tiny_bert, batch_size=1)).embed(texts)
    many = TransformersEngine(EngineOptions(model=tiny_bert, batch_size=4)).embed(texts)
    np.testing.assert_allclose(one, many, atol=1e-5)


# --- the CLI: --help, and SIGKILL halfway then rerun ----------------------------------------------------------


def test_cli_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Embed the fields, feature values, users or items" in out
    for option in ("--entity", "--engine", "--shard", "--num-shards", "--history-length", "--no-normalize"):
        assert option in out


def test_sigkill_halfway_then_rerun_equals_an_uninterrupted_run(ml100k: PreparedData, tiny_bert: Path,
                                                                tmp_path: Path, quiet_cli_env: None) -> None:
    args = ["--entity", "item", "--dataset", str(ml100k.folder), "--model", str(tiny_bert), "--engine",
            "transformers", "--batch-size", "8", "--part-size", "32", "--threads", "1", "--no-progress"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    parts = killed / "item" / "parts"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "embedding_jobs.run", *args, "--out", str(killed)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not list(parts.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    total = -(-(ml100k.field("item_id").vocab_size - 2) // 32)
    done = len(list(parts.glob("part-*.parquet")))
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert 0 < done < total, f"{done} of {total} parts written before the kill"
    assert not (killed / "item" / "table.parquet").exists()

    assert main([*args, "--out", str(killed)]) == 0  # the rerun: skips the finished parts
    assert main([*args, "--out", str(clean)]) == 0  # the reference: never interrupted
    fingerprint, rows = ml100k.schema.fingerprint, ml100k.field("item_id").vocab_size
    resumed = load_feature_table(killed / "item", expect_fingerprint=fingerprint, expect_entity="item",
                                 num_rows=rows)  # refuses duplicates and missing keys
    reference = load_feature_table(clean / "item", expect_fingerprint=fingerprint, expect_entity="item",
                                   num_rows=rows)
    keys = pq.read_table(killed / "item" / "table.parquet").column("key").to_numpy()
    assert len(keys) == len(np.unique(keys)) == rows - 2
    part_rows = sum(pq.read_metadata(p).num_rows for p in parts.glob("part-*.parquet"))
    assert part_rows == rows - 2  # one row per key across the parts too
    assert torch.equal(resumed.embeddings, reference.embeddings)


# --- vLLM against transformers (slow: each starts vLLM once) ---------------------------------------------------

VLLM_TEST_OPTIONS = VLLMOptions(gpu_memory_utilization=0.1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _mixed_texts(data: PreparedData) -> list[str]:
    """Short feature texts, item texts, long user texts, and one text longer than MiniLM's 256 tokens."""
    genres = next(t for t in feature_texts(data) if t.table == "genres").texts
    items = build_texts(data, FeatureEntity.ITEM, TemplateOptions())[0].texts[:40]
    users = build_texts(data, FeatureEntity.USER, TemplateOptions())[0].texts[:8]
    return [*genres, *items, *users, " ".join(users)]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_matches_transformers_on_minilm(ml100k: PreparedData, minilm: TransformersEngine) -> None:
    pytest.importorskip("vllm")
    from embedding_jobs.engines import VLLMEngine

    texts = _mixed_texts(ml100k)
    expected = minilm.embed(texts)
    before = minilm.num_truncated
    engine = VLLMEngine(EngineOptions(model=packaged_minilm()), VLLM_TEST_OPTIONS)
    try:
        got = engine.embed(texts)
    finally:
        engine.close()
    assert engine.info.pooling is Pooling.MEAN and engine.dim == 384 and engine.max_length == 256
    assert engine.num_truncated == before >= 1  # the same texts truncated, the same way
    cos = _cosines(got, expected)
    assert cos.min() >= 0.999, f"lowest cosine {cos.min():.6f} at text {int(cos.argmin())}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-4)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_matches_transformers_on_a_tiny_decoder(ml100k: PreparedData, tiny_decoder: Path) -> None:
    pytest.importorskip("vllm")
    from embedding_jobs.engines import VLLMEngine

    texts = _mixed_texts(ml100k)[:60]
    options = EngineOptions(model=tiny_decoder, normalize=False)  # raw last-token states
    transformers_engine = TransformersEngine(options)
    assert transformers_engine.info.pooling is Pooling.LAST  # a decoder's default
    expected = transformers_engine.embed(texts)
    engine = VLLMEngine(options, VLLM_TEST_OPTIONS)
    try:
        got = engine.embed(texts)
    finally:
        engine.close()
    cos = _cosines(got, expected)
    assert cos.min() >= 0.999, f"lowest cosine {cos.min():.6f} at text {int(cos.argmin())}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(expected, axis=1), rtol=1e-3)
