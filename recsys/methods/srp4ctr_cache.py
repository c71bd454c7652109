"""SRP4CTR's cache of history encodings: the frozen encoder's output for every distinct behaviour history.

The encoder's output of a history does not depend on the candidate, so a serving system computes it once per
user state (the user's history as of the request) and scoring a candidate costs only the cross-attention and the
Q-Former. The cache is a feature table (DESIGN contract 2) of entity ``history``:

- key: a 63-bit content hash of the history (:func:`history_keys`: every sequence field's stored ids, position
  by position). Two rows with the same history share a key, and a row's key is made from its own history,
  which holds only behaviours strictly earlier than the row, so no later behaviour can reach its encoding;
- embedding: the encoder's output ``[L, D]`` flattened to ``L * D`` floats (padded positions are zeros);
- metadata: the encoder's weights hash (:func:`encoder_hash`), the sequence fields, the dataset's
  fingerprint. A cache made from another encoder, another dataset or other sequence fields is refused.

Which states: ``embedding_jobs.history_encodings`` writes one entry for every history that occurs in the
splits it is given (by default train, valid and test): the state as of each evaluation row, which is exactly
what the trained model saw and what a real-time cache (refreshed on every new behaviour) would hold at that
moment. A cache of the state as of the end of training only would give test rows of users active since then
a stale encoding: cheaper to refresh, but not the model's own prediction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recsys.features.reader import check_expected, read_file, table_files
from recsys.features.table import FeatureEntity, FeatureTableError, FeatureTableMetadata

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
ENCODER_PREFIXES = ("combine.", "encoder.")  # the parts of FGBert that encode (heads and mask vectors do not)


class HistoryCacheMiss(KeyError):
    """A row whose history the cache does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message
        return str(self.args[0])


@torch.fx.wrap  # numpy inside: a leaf of any fx trace
def history_keys(ids: list[torch.Tensor]) -> torch.Tensor:
    """``[B]`` int64 keys: FNV-1a over each row's ids, field after field (``[B, L]`` padded ids each)."""
    cols = np.concatenate([x.detach().cpu().numpy().astype(np.int64) for x in ids], axis=1).view(np.uint64)
    h = np.full(cols.shape[0], _FNV_OFFSET, dtype=np.uint64)
    for j in range(cols.shape[1]):  # uint64 arithmetic wraps, as FNV wants
        h = (h ^ cols[:, j]) * _FNV_PRIME
    return torch.from_numpy((h >> np.uint64(1)).astype(np.int64)).to(ids[0].device)


def encoder_hash(fgbert: nn.Module) -> str:
    """sha256 over the encoding parts of the encoder's weights: what decides every cached vector."""
    h = hashlib.sha256()
    for name, t in sorted(fgbert.state_dict().items()):
        if name.startswith(ENCODER_PREFIXES):
            h.update(f"{name}:{tuple(t.shape)}\n".encode())
            h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class HistoryCache:
    """Sorted keys and their encodings; :meth:`lookup` gives ``[B, L, D]`` for a batch's keys."""

    keys: np.ndarray  # [N] int64, sorted, unique
    vectors: torch.Tensor  # [N, L * D] float32
    length: int
    dim: int
    meta: FeatureTableMetadata
    where: str

    @torch.no_grad()
    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        k = keys.cpu().numpy()
        idx = np.searchsorted(self.keys, k).clip(max=max(len(self.keys) - 1, 0))
        found = self.keys[idx] == k if len(self.keys) else np.zeros(len(k), bool)
        if not found.all():
            raise HistoryCacheMiss(
                f"{int((~found).sum())} of {len(k)} rows have a history that the cache {self.where} does not hold: it "
                "was made from other splits or another dataset; run python -m embedding_jobs.history_encodings over "
                "the rows you score (--splits)")
        return self.vectors[torch.from_numpy(idx)].view(len(k), self.length, self.dim).to(keys.device)


def cache_metadata(*, fields: tuple[str, ...], length: int, dim: int, num_rows: int, weights_hash: str,
                   dataset_name: str, fingerprint: str, run: str, splits: tuple[str, ...],
                   created_at: str) -> FeatureTableMetadata:
    return FeatureTableMetadata(
        entity=FeatureEntity.HISTORY, table=fields[0], num_rows=num_rows, dim=length * dim,
        model_name=f"srp4ctr encoder of {run}", weights_hash=weights_hash, engine="torch", pooling="none",
        normalize=False, max_length=length, dtype="float32", template_version=0, template_hash="",
        dataset_name=dataset_name, dataset_fingerprint=fingerprint, created_at=created_at,
        template_options={"fields": list(fields), "length": length, "embedding_dim": dim, "splits": list(splits)},
        model_path=run)


def load_history_cache(path: str | Path, *, fingerprint: str, fields: tuple[str, ...], length: int, dim: int,
                       weights_hash: str | None = None) -> HistoryCache:
    """Read a cache folder or file, refusing one made for another dataset, sequence layout or encoder."""
    files = table_files(path)
    metas, keys, vectors = [], [], []
    for file in files:
        meta, k, v = read_file(file)
        check_expected(meta, str(file), fingerprint=fingerprint, entity=FeatureEntity.HISTORY.value, table=fields[0],
                       dim=length * dim)
        metas.append(meta)
        keys.append(k)
        vectors.append(v)
    meta, where = metas[0], str(path)
    made_for = meta.template_options.get("fields")
    if made_for != list(fields):
        raise FeatureTableError(f"{where}: encodings of the sequence fields {made_for}, but this model reads {list(fields)}")
    other = [str(f) for f, m in zip(files, metas, strict=True) if m.weights_hash != meta.weights_hash]
    if other:
        raise FeatureTableError(f"{where}: parts made by different encoders are mixed ({other[:2]})")
    if weights_hash is not None and meta.weights_hash != weights_hash:
        raise FeatureTableError(
            f"{where}: made from another encoder (weights sha256 {meta.weights_hash[:12]}…, {meta.model_name}); this "
            f"model's encoder is {weights_hash[:12]}…: run python -m embedding_jobs.history_encodings on this model's run")
    k = np.concatenate(keys)
    order = np.argsort(k, kind="stable")
    k = k[order]
    if len(k) > 1 and (k[1:] == k[:-1]).any():
        raise FeatureTableError(f"{where}: key {int(k[1:][k[1:] == k[:-1]][0])} appears twice")
    v = torch.from_numpy(np.concatenate(vectors)[order])
    return HistoryCache(k, v, length, dim, meta, where)


__all__ = ["HistoryCache", "HistoryCacheMiss", "cache_metadata", "encoder_hash", "history_keys", "load_history_cache"]
