"""python -m recsys.train --config EXPERIMENT.yaml [section.key=value ...]

Trains a CTR model on a prepared dataset with sharded TorchRec embeddings, evaluates it on the test split
with the best validation checkpoint, and writes the run folder (see recsys.train.trainer). Run it with
torchrun (or TorchX) for several ranks: torchrun --nproc_per_node 2 -m recsys.train --config ...
"""

from __future__ import annotations

import argparse
import logging
import sys

from recsys.train.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML file (sections: name, data, model, optim, train)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override any setting, e.g. train.seed=3 model.backbone=dcnv2 data.batch_size=2048")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from recsys.train.trainer import Trainer, results_table  # heavy imports after --help
        trainer = Trainer(cfg)
        result = trainer.fit()
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if trainer.env.is_main:
        print(results_table(result))
        print(f"run folder: {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
