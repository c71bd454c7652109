"""What a sharded model holds, read for tests: its tables' weights and FBGEMM's optimizer state."""

from __future__ import annotations

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor


def embedding_weights(model: torch.nn.Module) -> torch.Tensor:
    """This rank's shards of every table, in one vector."""
    return torch.cat([shard.tensor.flatten() for t in model.state_dict().values() if isinstance(t, ShardedTensor)
                      for shard in t.local_shards()])


def fbgemm_optimizer_state(model: torch.nn.Module) -> list[torch.Tensor]:
    """The embedding optimizer's state as FBGEMM's kernels hold it (not the optimizer's views of it); the sharded
    modules keep their lookups in a plain list, out of ``modules()``."""
    kernels = [k for m in model.modules() for lookup in getattr(m, "_lookups", [])
               for k in lookup.modules() if hasattr(k, "split_optimizer_states")]
    assert kernels
    return [t for k in kernels for states in k.split_optimizer_states() for t in states]
