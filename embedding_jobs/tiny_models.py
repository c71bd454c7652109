"""Tiny language models built on this machine (no hub): random weights, real tokenizers, saved with
``save_pretrained`` so that both engines load them like any local model. For tests and benchmarks.

Example::

    >>> folder = save_tiny_decoder(Path("/tmp/qwen2-tiny"), corpus=["The movie's title is Heat."])  # doctest: +SKIP
"""

from __future__ import annotations

import json
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


def _byte_level_bpe(corpus: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``corpus``, with ``<|endoftext|>`` as its one special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[_END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return bpe


def save_tiny_decoder(folder: Path, corpus: Sequence[str], *, layers: int = 2, hidden: int = 128, heads: int = 2,
                      vocab_size: int = 2000, seed: int = 0) -> Path:
    """A random Qwen2 decoder with a byte-level BPE tokenizer trained on ``corpus``.

    Heads are 64 wide (``hidden / heads`` must be 64): vLLM's CPU attention rejects small heads such as 16.
    A BERT tokenizer would not do here: for a ``qwen2`` model, transformers loads a Qwen2 tokenizer, which
    reads a WordPiece vocabulary as single characters.
    """
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if hidden != 64 * heads:
        raise ValueError(f"hidden ({hidden}) must be 64 x heads ({heads}): vLLM on CPU needs heads of 64")
    bpe = _byte_level_bpe(corpus, vocab_size)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=_END, pad_token=_END, model_max_length=512)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=64,
                         intermediate_size=4 * hidden, max_position_embeddings=512, tie_word_embeddings=True)
    folder.mkdir(parents=True, exist_ok=True)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of q/k projections (its convert_hf_to_gguf ``permute``), which GGUF readers undo."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_tiny_gguf(path: Path, corpus: Sequence[str], *, layers: int = 2, hidden: int = 128, heads: int = 2,
                   kv_heads: int = 1, vocab_size: int = 600, seed: int = 0) -> Path:
    """A random Llama with tied embeddings (like SmolLM2) and a byte-level BPE tokenizer trained on ``corpus``,
    written as a float32 GGUF file by the ``gguf`` package, as llama.cpp writes one. The same model is saved as a
    Hugging Face folder beside it (``<path>.hf``), the reference a materialised copy must equal."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = _byte_level_bpe(corpus, vocab_size)
    spec = json.loads(bpe.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=2 * hidden,
                         max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    reference = Path(f"{path}.hf")
    model.save_pretrained(reference)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=_END, pad_token=_END,
                            model_max_length=512).save_pretrained(reference)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == _END else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    for add in (w.add_bos_token_id, w.add_eos_token_id, w.add_pad_token_id):
        add(tokens.index(_END))
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        rest = key.removeprefix("model.").removesuffix(".weight")
        if rest.startswith("layers."):
            _, block, part = rest.split(".", 2)
            name = f"blk.{block}.{names[part]}.weight"
            if part in ("self_attn.q_proj", "self_attn.k_proj"):
                t = _llama_cpp_permute(t, heads if part == "self_attn.q_proj" else kv_heads)
        else:
            name = f"{names[rest]}.weight"
        w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
