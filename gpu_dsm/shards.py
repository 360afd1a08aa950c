"""Extraction sharded over the processes of a ``torchrun`` job (torch.distributed, gloo).

    torchrun --nproc-per-node 2 -m gpu_dsm extract --dataset roxford5k --out stores/
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m gpu_dsm extract ...

Each rank describes a slice of the images balanced by pixel count (`balanced_slices`) and
writes it as a shard store beside the final one (``<store>.shard-<rank>of<world>``, written
atomically like every store). Once every rank is done, rank 0 merges the shards, image by image in
the images' order, into the store one process would have written (same descriptors and features
per image) and removes them. A run that is killed or fails leaves the finished shards: the next run
verifies them (names, counts) and extracts only the missing ones. A rank that fails makes torchrun
end the whole job with that rank's error; no final store is published without every shard.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from gpu_dsm.how import HOWConfig, HOWFeatures, fit_how_whitening, how_checkpoint, how_moments, merge_how_features
from gpu_dsm.images import ImageSpec, target_size
from gpu_dsm.store import FeatureStore, StoreWriter
from gpu_dsm.whitening import Whitening, pca_whitening_from_moments


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` (1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Ranks":
        """torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (a plain process: rank 0 of 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _group(self):
        """``torch.distributed``, its gloo process group initialised on first use."""
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        return dist

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            self._group().barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` (any shape and dtype) over every rank (each rank gets the same
        bits), of its shape and dtype on its device; summed on the CPU (gloo)."""
        if not self.distributed:
            return tensor
        summed = tensor.detach().cpu().clone()
        self._group().all_reduce(summed)  # a collective: every rank waits for the others here
        return summed.to(tensor.device)

    def device(self, device: str) -> str:
        """``cuda`` becomes this rank's GPU (``cuda:<local rank>``); anything else is kept."""
        return f"cuda:{self.local_rank}" if self.distributed and device == "cuda" else device


def balanced_slices(costs: Sequence[float], world: int) -> list[list[int]]:
    """Split items ``0..N-1`` with ``costs`` into ``world`` slices of nearly equal total cost:
    largest first, each to the slice with the least cost so far (ties: lowest rank); every slice
    in increasing index order. Deterministic, so every rank computes the same slices."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    order = sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i))
    totals = [0.0] * world
    slices: list[list[int]] = [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda j: (totals[j], j))
        slices[r].append(i)
        totals[r] += float(costs[i])
    return [sorted(s) for s in slices]


def pixel_costs(specs: Sequence[ImageSpec], image_size: int, upscale: bool) -> list[int]:
    """Pixels each image is extracted at (file headers only): the cost `balanced_slices` balances."""
    return [w * h for w, h in (target_size(s, image_size, upscale) for s in specs)]


def shard_path(path: Path, rank: int, world: int) -> Path:
    return path.with_name(f"{path.name}.shard-{rank}of{world}")


def _valid_shard(path: Path, names: list[str]) -> bool:
    try:
        store = FeatureStore(path)
    except (OSError, ValueError):
        return False
    return store.names == names


def merge_shards(shards: Sequence[Path], indices: Sequence[Sequence[int]], names: Sequence[str], path: Path) -> FeatureStore:
    """Write the store of all ``names`` at ``path`` from shard stores holding images ``indices[s]``
    (in the shards' order), image by image in index order; atomically."""
    opened = [FeatureStore(p) for p in shards]
    where = {}
    for s, rows in enumerate(indices):
        for j, i in enumerate(rows):
            where[i] = (s, j)
    if sorted(where) != list(range(len(names))):
        raise ValueError(f"shards of {path} cover {len(where)} of {len(names)} images")
    first = opened[0]
    local = None
    if first.has_local:
        local = {"scales": first.meta["local"]["scales"], "num_channels": first.meta["local"]["num_channels"]}
    with StoreWriter(path, names, first.meta["global_dim"], first.options, local=local) as writer:
        for i in range(len(names)):
            s, j = where[i]
            writer.add_global(i, opened[s].global_descriptors([j])[0])
            if local is not None:
                feats = opened[s].local_features([j])
                writer.add_local(i, feats.image(0), feats.map_sizes[0])
    return FeatureStore(path)


def run_sharded(ranks: Ranks, costs: Sequence[float], path: Path, make_shard: Callable[[list[int], Path], object],
                finished: Callable[[Path, list[int]], bool], merge: Callable[[list[Path], list[list[int]], Path], object],
                log=print) -> None:
    """Make the file or folder at ``path`` from images ``0..N-1`` split over ``ranks`` by ``costs``.

    Each rank makes its shard (``make_shard(its images, shard path)``, atomically) unless ``finished``
    says a shard from an interrupted run is complete; every rank waits for the others; rank 0
    merges the shards (``merge(shard paths, slices, path)``) and removes them; every rank waits
    for the merge. A rank that raises ends the job (torchrun stops the others): no merge happens."""
    slices = balanced_slices(costs, ranks.world)
    mine = slices[ranks.rank]
    own = shard_path(path, ranks.rank, ranks.world)
    if finished(own, mine):
        log(f"rank {ranks.rank}: reusing finished shard {own.name} ({len(mine)} images)")
    else:
        log(f"rank {ranks.rank}/{ranks.world}: {len(mine)} of {len(costs)} images, {sum(costs[i] for i in mine) / 1e6:.1f} Mpx "
            f"-> {own.name}")
        make_shard(mine, own)
    ranks.barrier()
    if ranks.rank == 0:
        shards = [shard_path(path, r, ranks.world) for r in range(ranks.world)]
        merge(shards, slices, path)
        for shard in shards:
            if shard.is_dir():
                shutil.rmtree(shard, ignore_errors=True)
            else:
                shard.unlink(missing_ok=True)
        log(f"merged {ranks.world} shards -> {path}")
    ranks.barrier()


def write_sharded(ranks: Ranks, specs: Sequence[ImageSpec], names: Sequence[str], path: Path, costs: Sequence[float],
                  write: Callable[[list[ImageSpec], list[str], Path], FeatureStore], log=print) -> FeatureStore:
    """The store of ``specs`` at ``path``, its images split over ``ranks`` by ``costs`` (`run_sharded`):
    ``write(specs, names, shard_path)`` writes one shard; every rank returns the merged store."""
    run_sharded(ranks, costs, path, lambda rows, own: write([specs[i] for i in rows], [names[i] for i in rows], own),
                lambda own, rows: _valid_shard(own, [names[i] for i in rows]),
                lambda shards, slices, out: merge_shards(shards, slices, list(names), out), log)
    return FeatureStore(path)


def sharded_how_whitening(backbone, images: Sequence[ImageSpec], how: HOWConfig, ranks: Ranks) -> Whitening:
    """HOW's whitening of ``images`` (`gpu_dsm.how.fit_how_whitening`) with the moments
    summed over the ranks' slices of the images; every rank gets the same whitening."""
    if not ranks.distributed or how_checkpoint(backbone) is not None:  # a HOW checkpoint's reduction is not fitted
        return fit_how_whitening(backbone, images, how)
    if not images:
        raise ValueError("fit_how_whitening: no images")
    mine = balanced_slices(pixel_costs(images, how.image_size, how.upscale), ranks.world)[ranks.rank]
    count, total, outer = how_moments(backbone, [images[i] for i in mine], how)
    net_dim = outer.shape[0]
    summed = ranks.all_reduce_sum(torch.cat([torch.tensor([float(count)], dtype=torch.float64, device=total.device),
                                             total, outer.reshape(-1)]))
    return pca_whitening_from_moments(int(summed[0]), summed[1:1 + net_dim], summed[1 + net_dim:].reshape(net_dim, net_dim),
                                      how.dim)


def sharded_how_features(images: Sequence[ImageSpec], path: Path, describe: Callable[[list[ImageSpec]], HOWFeatures],
                         how: HOWConfig, ranks: Ranks, log=print) -> HOWFeatures | None:
    """HOW features of ``images`` described slice by slice over ``ranks`` (``describe(images)``)
    and merged by rank 0 at ``path`` (rank 0 returns them, the others ``None``)."""
    def finished(shard: Path, rows: list[int]) -> bool:
        try:
            return HOWFeatures.load(shard).num_images == len(rows)
        except (OSError, ValueError):
            return False

    def merge(shards: list[Path], slices: list[list[int]], out: Path) -> None:
        merge_how_features([HOWFeatures.load(s) for s in shards], slices, len(images)).save(out)

    run_sharded(ranks, pixel_costs(images, how.image_size, how.upscale), path,
                lambda rows, own: describe([images[i] for i in rows]).save(own), finished, merge, log)
    return HOWFeatures.load(path) if ranks.rank == 0 else None
