"""python -m recsys.train --config EXPERIMENT.yaml [section.key=value ...]

Trains a CTR model on a prepared dataset with sharded TorchRec embeddings, evaluates it on the test split
with the best validation checkpoint, and writes the run folder (see recsys.train.trainer). Run it with
torchrun (or TorchX) for several ranks: torchrun --nproc_per_node 2 -m recsys.train --config ...

The method (method.name=NAME, its options under method.<section>) wraps the backbone (model.backbone=NAME).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from recsys.train.config import ConfigError


class _ThirdPartyFilter(logging.Filter):
    """Drop torch/torchrec/fbgemm records below ERROR (the planner warns about every replicated table)."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/torchrec/", "/torch/", "/fbgemm_gpu/"))
        return record.levelno >= logging.ERROR or not noisy


def quiet_third_party() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ThirdPartyFilter())
    for name in ("torchrec", "torch.distributed", "torch.fx", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from recsys.experiment import build_trainer, load_config, method_summaries

    p = argparse.ArgumentParser(prog="python -m recsys.train", description=__doc__,
                                epilog="methods:\n" + method_summaries(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML file (sections: name, data, model, method, optim, train)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override any setting, e.g. train.seed=3 model.backbone=dcnv2 data.batch_size=2048")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--verbose", action="store_true", help="also show torch/torchrec warnings and info logs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if not args.verbose:
        quiet_third_party()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from recsys.train.checkpoint import CheckpointMismatchError, UnsafeCheckpointError
        from recsys.train.trainer import results_table
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    try:
        trainer = build_trainer(cfg)
        result = trainer.fit()
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except (UnsafeCheckpointError, CheckpointMismatchError) as e:
        print(f"checkpoint refused: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a loss or validation metric that is not a number: say why, no traceback
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    if trainer.env.is_main:
        print(results_table(result))
        print(f"run folder: {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
