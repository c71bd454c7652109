"""python -m recsys.serve.export --run RUN_DIR --out EXPORT_DIR

Export the served model of a finished training run as a folder that loads and scores with ``recsys`` alone:
no language model, transformers or vLLM. Bare backbones (methods ``none``, ``embedding_l2``, ``elec_student``,
ClickPrompt's mode (b)) need nothing else; SRP4CTR serves from its cached history encodings
(``--history-cache``, made by ``python -m embedding_jobs.history_encodings``), copied into the export, without
its sequence encoder. The run's sharded checkpoint (any number of ranks) is gathered into plain tensors.

Example:
  python -m recsys.serve.export --run runs/train/ml100k_deepfm_student --out runs/export/ml100k_deepfm
  python -m recsys.serve.score --model runs/export/ml100k_deepfm --input runs/data/ml-100k/test.parquet \
      --out runs/scores/ml100k_test.parquet
  python -m recsys.serve.export --run runs/train/srp --history-cache runs/features/ml-100k/srp_history \
      --out runs/export/srp
"""

from __future__ import annotations

import argparse
import logging
import sys

from recsys.train.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys.serve.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a training run folder (config.yaml, checkpoints/)")
    p.add_argument("--out", required=True, help="the export folder to write (replaced if it exists)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="which checkpoint of the run (default: best, the one the test metrics come from)")
    p.add_argument("--history-cache", default=None,
                   help="SRP4CTR: the run's history encodings (python -m embedding_jobs.history_encodings)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from recsys.serve.artifact import export_run

    try:
        inputs = {"history_cache": args.history_cache} if args.history_cache else {}
        out = export_run(args.run, args.out, args.checkpoint, inputs)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.run} ({args.checkpoint}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
