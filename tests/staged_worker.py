"""Worker of the two-rank stage test (run by torchrun): the staged test task through the real trainer.

    torchrun --nproc_per_node 2 tests/staged_worker.py DATA OUT
"""

from __future__ import annotations

import sys

from staged_task import StagedTask

from recsys.data.schema import PreparedSchema
from recsys.experiment import load_config
from recsys.train.distributed import init_distributed
from recsys.train.trainer import Trainer, seed_everything


def main(data: str, out: str) -> int:
    cfg = load_config(None, [f"data.path={data}", f"train.out_dir={out}", "name=staged", "data.batch_size=16",
                             "data.eval_batch_size=32", "model.embedding_dim=8", "model.backbone=dcnv2",
                             "train.progress=false", "train.epochs=2", "train.max_steps_per_epoch=3",
                             "train.sharding_types=[table_wise]"])
    env = init_distributed()
    schema = PreparedSchema.load(data)
    seed_everything(cfg.train.seed)
    Trainer(cfg, StagedTask(schema, cfg), env, schema).fit()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
