"""A fake embedding engine for the job tests: deterministic vectors from a hash of each text, no model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from embedding_jobs.engines import EngineKind, ModelInfo
from embedding_jobs.jobs import JobOptions, run_job
from embedding_jobs.model_files import Pooling
from recsys.features import FeatureEntity

DIM = 8


class FakeEngine:
    """Deterministic vectors from a hash of each text; counts what it embeds; can crash on purpose."""

    def __init__(self, info: ModelInfo, crash_after_texts: int | None = None) -> None:
        self.info = info
        self.num_truncated = 0
        self.embedded: list[str] = []
        self.crash_after_texts = crash_after_texts
        self.closed = False

    dim = property(lambda self: self.info.dim)
    max_length = property(lambda self: self.info.max_length)
    model_name = property(lambda self: self.info.model_name)
    weights_hash = property(lambda self: self.info.weights_hash)

    def embed(self, texts: list[str]) -> np.ndarray:
        if self.crash_after_texts is not None and len(self.embedded) >= self.crash_after_texts:
            raise KeyboardInterrupt("simulated crash")
        self.embedded.extend(texts)
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
        return np.stack([np.random.default_rng(s).standard_normal(DIM).astype(np.float32) for s in seeds])

    def close(self) -> None:
        self.closed = True


FAKE_MODEL = ModelInfo(engine=EngineKind.TRANSFORMERS, model_name="fake/model", model_path="/fake",
                       weights_hash="0" * 64, dim=DIM, max_length=32, pooling=Pooling.MEAN, normalize=True,
                       dtype="float32")


def run_fake(out: Path, dataset: Path, entity: str, engine: FakeEngine | None = None, **options: object):
    engine = engine or FakeEngine(FAKE_MODEL)
    job = JobOptions(entities=tuple(FeatureEntity(e) for e in entity.split(",")), dataset=dataset, out=out,
                     batch_size=2, part_size=3, progress=False, **options)
    return run_job(job, FAKE_MODEL, lambda: engine), engine


if __name__ == "__main__":  # python tests/fake_engine.py DATASET OUT ENTITIES: the job with the fake engine
    import sys

    run_fake(Path(sys.argv[2]), Path(sys.argv[1]), sys.argv[3])
