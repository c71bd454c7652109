"""Process group set-up and TorchRec sharding: planner, fused embedding optimizers, DistributedModelParallel."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
    get_default_sharders,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.device import compute_device
from recsys.train.config import ConfigError, OptimConfig

log = logging.getLogger(__name__)

# No data_parallel: a data-parallel table gets TorchRec's dense kernel, outside the fused FBGEMM optimizer,
# and the per-table parameters it exposes are views that never receive a gradient, so with the dense
# optimizer built from them the table silently stays at its initial values. Every table is model-parallel.
CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
# TorchRec's EmbeddingCollection (per-position sequence tables) takes fewer types than the bag collection
SEQUENCE_SHARDING_TYPES = ("table_wise", "column_wise", "row_wise")
GPU_SHARDING_TYPES = (*CPU_SHARDING_TYPES, "row_wise", "table_row_wise", "grid_shard")
EMBEDDING_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad,
                        "sgd": torch.optim.SGD, "adam": torch.optim.Adam}
DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad,
                    "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 300.0, init_timeout_s: float = 60.0) -> DistEnv:
    """Join the job's process group (torchrun/TorchX set RANK etc.), or make a 1-process group.

    NCCL on GPUs, gloo on CPUs. ``timeout_s`` bounds how long a collective waits for a lost rank
    (``RECSYS_DIST_TIMEOUT_S`` overrides it). Forming the group (connecting every rank and one barrier) must
    finish within ``init_timeout_s`` (``RECSYS_DIST_INIT_TIMEOUT_S``), or the process exits with
    ``INIT_TIMEOUT_EXIT`` so that torchrun restarts the ranks or fails the job, instead of waiting forever.
    """
    timeout_s = float(os.environ.get("RECSYS_DIST_TIMEOUT_S", timeout_s))
    init_timeout_s = float(os.environ.get("RECSYS_DIST_INIT_TIMEOUT_S", init_timeout_s))
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = compute_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            with _init_watchdog(rank, init_timeout_s):
                dist.init_process_group(backend, store=_restart_safe_store(timeout), rank=rank, world_size=world,
                                        timeout=timeout)
                dist.barrier()
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(rank, world, local_rank, local_world, device)


INIT_TIMEOUT_EXIT = 75  # EX_TEMPFAIL: a restart may succeed


@contextlib.contextmanager
def _init_watchdog(rank: int, bound_s: float):
    """End this process if the process group is not formed within ``bound_s``: a backstop, not the fix.

    A rank blocked in a gloo/NCCL connect cannot be interrupted from Python, so the watchdog exits hard; the
    elastic agent sees the failure and restarts every rank (or, out of restarts, fails the job naming this one).
    """
    def expire() -> None:
        log.error("rank %d: the process group was not formed within %.0f s (store %s:%s, attempt %s); exiting so "
                  "that torchrun can restart the ranks", rank, bound_s, os.environ.get("MASTER_ADDR"),
                  os.environ.get("MASTER_PORT"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        logging.shutdown()
        os._exit(INIT_TIMEOUT_EXIT)

    timer = threading.Timer(bound_s, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _restart_safe_store(timeout: timedelta) -> dist.Store | None:
    """The store the process group forms in, with no key left from an earlier attempt of the job.

    torchrun's c10d rendezvous shares one TCP store across restarts by default, and the process group's keys
    (each rank's gloo address, NCCL's unique id) carry no attempt number, so a restarted rank can read the
    dead rank's address and connect to nothing, or hang (pytorch/pytorch#135712). The TorchX components set
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives every rendezvous round a fresh store: then, as
    without torchrun, None (``init_process_group``'s own env:// rendezvous). When the store is shared and the
    job runs on one node, there is one agent, whose restart count is the same for every rank: it names the
    attempt. Across nodes each agent counts for itself, so only the variable helps.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
        if int(os.environ.get("RANK", 0)) == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
            log.warning("torchrun shares one TCP store across restarts on several nodes: a restart can read a lost "
                        "rank's stale address and fail or hang (pytorch/pytorch#135712); launch with "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the TorchX components do)")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def embedding_tables(model: nn.Module) -> list[EmbeddingBagCollection | EmbeddingCollection]:
    """Every TorchRec embedding module of ``model``: pooled (EBC) and per-position (EC)."""
    return [m for m in model.modules() if isinstance(m, EmbeddingBagCollection | EmbeddingCollection)]


def table_configs(model: nn.Module) -> list:
    """The table configurations of every embedding module of ``model``."""
    return [c for m in embedding_tables(model) for c in (
        m.embedding_bag_configs() if isinstance(m, EmbeddingBagCollection) else m.embedding_configs())]


def check_optim(cfg: OptimConfig, device: torch.device) -> None:
    if cfg.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ConfigError(f"optim.embedding_optimizer {cfg.embedding_optimizer!r} is not one of "
                          f"{sorted(EMBEDDING_OPTIMIZERS)}")
    if cfg.embedding_optimizer == "adam" and device.type == "cpu":
        raise ConfigError("optim.embedding_optimizer=adam: FBGEMM's fused Adam runs on GPUs only; on CPU use "
                          "adagrad, rowwise_adagrad or sgd")
    if cfg.dense_optimizer not in DENSE_OPTIMIZERS:
        raise ConfigError(f"optim.dense_optimizer {cfg.dense_optimizer!r} is not one of {sorted(DENSE_OPTIMIZERS)}")


def check_sharding_types(types: list[str] | None, device: torch.device) -> None:
    allowed = CPU_SHARDING_TYPES if device.type == "cpu" else GPU_SHARDING_TYPES
    for t in types or []:
        if t not in allowed:
            hint = " (row-wise sharding needs GPUs)" if "row" in t and device.type == "cpu" else ""
            if t == "data_parallel":
                hint = " (data-parallel tables would not be trained by the fused embedding optimizer)"
            raise ConfigError(f"train.sharding_types: {t!r} is not available on {device.type}{hint}; "
                              f"choose from {list(allowed)}")


def fuse_embedding_optimizer(model: nn.Module, cfg: OptimConfig) -> None:
    """Embedding updates run inside backward as FBGEMM fused kernels (no dense gradient for tables)."""
    opt_cls = EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer]
    kwargs: dict = {"lr": cfg.embedding_lr}
    if cfg.embedding_optimizer in ("adagrad", "rowwise_adagrad", "adam"):
        kwargs["eps"] = cfg.embedding_eps
    params = [p for ebc in embedding_tables(model) for p in ebc.parameters()]
    apply_optimizer_in_backward(opt_cls, params, kwargs)


HOST_RESERVE = 0.15


def topology(env: DistEnv) -> Topology:
    """The planner's view of the machine, with its real memory: TorchRec assumes 128 GB of host memory (and
    32 GB of HBM) per rank, so a plan too large for the machine would pass and the job be killed later. With
    the real figures the planner refuses it, naming the tables and the storage they need. TorchRec keeps a
    15% margin of HBM for what it does not count (allocator, activations); host memory gets the same margin
    here (the loader, checkpoint writes, the process itself), which its planner does not give it."""
    host = int((1 - HOST_RESERVE) * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // env.local_world_size
    hbm = torch.cuda.get_device_properties(env.device).total_memory if env.device.type == "cuda" else None
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=env.world_size, local_world_size=env.local_world_size, ddr_cap_bytes=host,
                      hbm_cap_bytes=hbm), kernel_config=KernelConfig(compute_device=env.device.type))


def plan_tables(model: nn.Module, env: DistEnv, per_rank_batch: int, sharding_types: list[str] | None,
                table_sharding: dict[str, str] | None = None) -> ShardingPlan:
    """The planner's plan for every embedding table of ``model`` (agreed by every rank; nothing allocated).

    ``sharding_types`` limits what the planner may choose for every table (None: any this device allows);
    ``table_sharding`` fixes the type of single tables by name (``{"t_user_id": "column_wise"}``). A plan
    larger than the machine's memory raises ``PlannerError``.
    """
    default = list(sharding_types or (CPU_SHARDING_TYPES if env.device.type == "cpu" else GPU_SHARDING_TYPES))
    check_sharding_types(list((table_sharding or {}).values()), env.device)

    per_position = {c.name for m in embedding_tables(model) if isinstance(m, EmbeddingCollection)
                    for c in m.embedding_configs()}

    def constraint(table: str, dim: int) -> ParameterConstraints:
        allowed = [table_sharding[table]] if table_sharding and table in table_sharding else default
        explicit = bool(sharding_types) or allowed is not default
        if table in per_position:
            allowed = [t for t in allowed if t in SEQUENCE_SHARDING_TYPES]
            if not allowed:
                raise ConfigError(f"{table} is a per-position (sequence) table: TorchRec's EmbeddingCollection shards "
                                  "it table_wise or column_wise (row_wise on GPUs), not as "
                                  f"{table_sharding.get(table) if table_sharding else sharding_types}")
        # Column-wise shards are at least min_partition wide (default 32, wider than CTR tables): when asked
        # for column-wise sharding, allow one shard per rank so that it actually splits a table.
        split = explicit and any("column" in t for t in allowed)
        return ParameterConstraints(sharding_types=allowed,
                                    min_partition=max(4, dim // env.world_size) if split else None)

    constraints = {cfg.name: constraint(cfg.name, cfg.embedding_dim) for cfg in table_configs(model)}
    planner = EmbeddingShardingPlanner(topology=topology(env), batch_size=per_rank_batch, constraints=constraints)
    return planner.collective_plan(model, get_default_sharders(), dist.GroupMember.WORLD)


def plan_and_shard(model: nn.Module, env: DistEnv, per_rank_batch: int, sharding_types: list[str] | None,
                   table_sharding: dict[str, str] | None = None,
                   find_unused_parameters: bool = False) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan (:func:`plan_tables`) and shard every embedding table of ``model``.

    ``find_unused_parameters``: the dense part's DDP may see steps that use only some parameters (a task with
    several stages); by default DDP assumes one static graph.
    """
    plan = plan_tables(model, env, per_rank_batch, sharding_types, table_sharding)
    wrapper = (DefaultDataParallelWrapper(static_graph=False, find_unused_parameters=True)
               if find_unused_parameters else None)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=get_default_sharders(),
                                   data_parallel_wrapper=wrapper)
    return dmp, plan


def describe_plan(plan: ShardingPlan) -> str:
    """One line per table: module, table, sharding type, kernel, ranks (and column split)."""
    lines = [f"{'module':<28} {'table':<18} {'sharding':<18} {'kernel':<14} ranks"]
    for module, params in plan.plan.items():
        for table, ps in params.items():
            ranks = ps.ranks or []
            extra = ""
            if ps.sharding_type in (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value):
                extra = " cols " + ",".join(str(s.shard_sizes[1]) for s in ps.sharding_spec.shards) \
                    if ps.sharding_spec else ""
            lines.append(f"{module or '-':<28} {table:<18} {ps.sharding_type:<18} {ps.compute_kernel:<14} "
                         f"{ranks}{extra}")
    return "\n".join(lines)


def embedding_bytes(dmp: DistributedModelParallel) -> int:
    """Bytes this rank holds of every embedding table: its shards' weights and their fused optimizer state."""
    optimizer_state = dmp.fused_optimizer.state_dict()["state"].values()
    tensors = [*dmp.state_dict().values(), *(t for state in optimizer_state for t in state.values())]
    total = 0
    for t in tensors:
        if isinstance(t, ShardedTensor):
            total += sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
        elif isinstance(t, DTensor):
            total += t.to_local().numel() * t.element_size()
    return total


def set_fused_learning_rate(dmp: DistributedModelParallel, lr: float) -> None:
    """The fused embedding optimizer's learning rate from the next backward on (FBGEMM takes it on ``step()``;
    the updates themselves run inside backward)."""
    for group in dmp.fused_optimizer.param_groups:
        group["lr"] = lr
    dmp.fused_optimizer.step()


def zero_fused_optimizer_state(dmp: DistributedModelParallel) -> None:
    """Zero this rank's fused embedding optimizer state (e.g. Adagrad's sums) in place: a fresh optimizer."""
    for state in dmp.fused_optimizer.state.values():
        for t in state.values():
            if isinstance(t, ShardedTensor):
                for shard in t.local_shards():
                    shard.tensor.zero_()
            elif isinstance(t, DTensor):
                t.to_local().zero_()
            elif isinstance(t, torch.Tensor):
                t.zero_()


def dense_parameters(dmp: nn.Module) -> dict[str, nn.Parameter]:
    return dict(in_backward_optimizer_filter(dmp.named_parameters()))
