"""Tiny language models built on this machine (no hub): random weights, real tokenizers, saved with
``save_pretrained`` so that both engines load them like any local model. For tests and benchmarks.

Example::

    >>> folder = save_tiny_decoder(Path("/tmp/qwen2-tiny"), corpus=["The movie's title is Heat."])  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from embedding_jobs.model_files import packaged_minilm

_MINILM_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_END = "<|endoftext|>"


def save_tiny_encoder(folder: Path, *, layers: int = 2, hidden: int = 64, heads: int = 2, seed: int = 0) -> Path:
    """A random BERT with the packaged MiniLM's WordPiece tokenizer (30,522 tokens)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=512)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(folder)
    for name in _MINILM_TOKENIZER:
        shutil.copy(packaged_minilm() / name, folder / name)
    return folder


def save_tiny_masked_lm(folder: Path, *, layers: int = 2, hidden: int = 64, heads: int = 2, seed: int = 0) -> Path:
    """A random BERT masked language model (its MLM head saved too) with the packaged MiniLM's tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=512)
    folder.mkdir(parents=True, exist_ok=True)
    BertForMaskedLM(config).save_pretrained(folder)
    for name in _MINILM_TOKENIZER:
        shutil.copy(packaged_minilm() / name, folder / name)
    return folder


def save_tiny_decoder(folder: Path, corpus: Sequence[str], *, layers: int = 2, hidden: int = 128, heads: int = 2,
                      vocab_size: int = 2000, seed: int = 0) -> Path:
    """A random Qwen2 decoder with a byte-level BPE tokenizer trained on ``corpus``.

    Heads are 64 wide (``hidden / heads`` must be 64): vLLM's CPU attention rejects small heads such as 16.
    A BERT tokenizer would not do here: for a ``qwen2`` model, transformers loads a Qwen2 tokenizer, which
    reads a WordPiece vocabulary as single characters.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if hidden != 64 * heads:
        raise ValueError(f"hidden ({hidden}) must be 64 x heads ({heads}): vLLM on CPU needs heads of 64")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[_END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=_END, pad_token=_END, model_max_length=512)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=64,
                         intermediate_size=4 * hidden, max_position_embeddings=512, tie_word_embeddings=True)
    folder.mkdir(parents=True, exist_ok=True)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
