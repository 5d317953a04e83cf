"""Ranking sharded over heads: one Ray actor per GPU (or per CPU node) holds a slice of heads.

The driver streams program chunks exactly as :func:`attnprog.engine.rank.rank` does (same
chunk boundaries, same ``outputs.rows``), puts each chunk into the object store once, and
every shard actor scores it against its heads with the same :func:`score_chunk` (so the
same ``sum_min`` kernel). Shards return disjoint column blocks of the IoU table, which the
driver copies into place: no arithmetic happens in the merge, so the table equals the
single-process one bit for bit wherever the kernel's sums do not depend on how many heads it
sees (numba on CPUs; on GPUs the Triton kernel's atomic text splits may change the last bits).

Fault tolerance: a shard's attention lives in the object store, owned by the driver. When an
actor dies (its process or its node is lost), the driver starts a replacement, which Ray
places wherever resources are free, and re-sends only the chunks that actor had in flight.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from attnprog.engine.rank import (
    DEFAULT_MEMORY_BUDGET,
    IoUTable,
    _check_outputs,
    _split_cells,
    chunk_size,
    prepare_split,
    rank_with_heldout,
    score_chunk,
    table_of,
)
from attnprog.engine.store import AttentionStore
from attnprog.errors import ClusterError, StoreError
from attnprog.kernels.iou import resolve_impl

from .cluster import connect, resources

MAX_IN_FLIGHT = 2  # chunks outstanding at once: the driver reads chunk k+1 while shards score k


HEAD_TILE = 64  # the sum-min kernels pad a shard's heads to whole tiles of this many


def head_slices(n_heads: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) head_index ranges over ``n_heads`` heads of all layers, one per
    shard, cut at whole tiles of 64 heads when there are enough tiles (a cut inside a tile pads
    both halves: more work in all)."""
    tiles = -(-n_heads // HEAD_TILE)
    if tiles >= shards:
        parts = np.array_split(np.arange(tiles), shards)
        return [(int(t[0]) * HEAD_TILE, min(n_heads, (int(t[-1]) + 1) * HEAD_TILE)) for t in parts]
    return [(int(b[0]), int(b[-1]) + 1) for b in np.array_split(np.arange(n_heads), shards)]


class RankShard:
    """A Ray actor: one contiguous slice of heads, resident on its device, scoring chunks."""

    def __init__(self, shard: AttentionStore, device: str, impl: str, threads: int):
        if threads > 0:  # a CPU shard uses the cores Ray gave it, not the whole node's
            torch.set_num_threads(threads)
            try:
                import numba

                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            except ImportError:
                pass
        self.shard = shard.to(device)
        self.impl = impl
        self.targets = {}  # split -> SplitAttention, prepared once per split

    def info(self) -> dict:
        """Where this actor runs: process id, device, the sum-min path it resolved, and the
        CPU seconds its process has used (a shard's share of the work on a busy machine)."""
        impl = resolve_impl(self.impl, self.shard.device)
        return {"pid": os.getpid(), "device": str(self.shard.device), "impl": impl,
                "cpu_s": time.process_time()}

    def score(self, split, values: np.ndarray, failed: np.ndarray, per_text: bool):
        """(mean IoU [programs, heads], per-text IoU [programs, heads, texts] or None) of one
        chunk's programs vs. this shard's heads."""
        # arrays from the object store are read-only; torch wants writable ones
        values = np.require(values, dtype=np.float32, requirements="W")
        iou = score_chunk(self._target(split), values, np.array(failed, dtype=bool))
        return iou.mean(dim=2).cpu(), (iou.cpu() if per_text else None)

    def _target(self, split):
        if split not in self.targets:
            self.targets[split] = prepare_split(self.shard, split, self.impl)
        return self.targets[split]


class ShardedRanker:
    """Ranks program chunks against ``store``'s heads, split over ``shards`` Ray actors.

    ``device``: "auto" (GPUs when the cluster has them, one actor per GPU; otherwise one
    actor per node with its CPUs), "cuda" or "cpu". ``shards`` and ``cpus_per_shard``
    override the counts. Use as a context manager (actors stop on exit); :meth:`rank` has
    :func:`attnprog.engine.rank.rank`'s signature.
    """

    def __init__(self, store: AttentionStore, *, address: str = "auto", device: str = "auto",
                 shards: int | None = None, cpus_per_shard: int | None = None,
                 impl: str = "auto", max_retries: int = 3):
        self.ray = connect(address)
        found = resources()
        if device == "auto":
            device = "cuda" if found["GPU"] >= 1 else "cpu"
        if device.startswith("cuda") and found["GPU"] < 1:
            raise ClusterError("device 'cuda' asked for, but the Ray cluster has no GPUs")
        nodes = max(1, int(found["nodes"]))
        if shards is None:
            shards = int(found["GPU"]) if device.startswith("cuda") else nodes
        shards = max(1, min(int(shards), store.n_rows))
        if cpus_per_shard is None:
            cpus_per_shard = 1 if device.startswith("cuda") else max(1, int(found["CPU"]) // shards)
        gpus_needed = shards if device.startswith("cuda") else 0
        if shards * cpus_per_shard > found["CPU"] or gpus_needed > found["GPU"]:
            # Ray would wait forever for an actor it cannot place
            raise ClusterError(
                f"{shards} shards x {cpus_per_shard} CPUs ({gpus_needed} GPUs) do not fit the "
                f"cluster's {found['CPU']:g} CPUs and {found['GPU']:g} GPUs: ask for fewer shards"
            )
        self.store, self.device, self.impl = store, device, impl
        self.cpus, self.max_retries, self.retries = int(cpus_per_shard), int(max_retries), 0
        # each slice's attention goes to the object store once, owned by this driver, so a
        # replacement actor can read it after a loss
        self.bounds = head_slices(store.n_rows, shards)
        cpu_store = dataclasses.replace(store, attn_packed=store.attn_packed[:0].cpu())
        self.shard_refs = [
            self.ray.put(dataclasses.replace(cpu_store, attn_packed=store.attn_packed[h0:h1]
                                             .detach().cpu().contiguous()))
            for h0, h1 in self.bounds
        ]
        self._actor_class = self.ray.remote(RankShard)
        self.actors = [self._start(s) for s in range(shards)]

    # --- actors ----------------------------------------------------------------------------
    def _start(self, shard: int):
        gpus = 1 if self.device.startswith("cuda") else 0
        actor = self._actor_class.options(num_cpus=self.cpus, num_gpus=gpus)
        device = "cuda" if gpus else "cpu"  # Ray shows each GPU actor its own GPU as cuda:0
        return actor.remote(self.shard_refs[shard], device, self.impl, 0 if gpus else self.cpus)

    def info(self) -> list[dict]:
        """Each shard actor's pid, device and sum-min path (waits for the actors to start)."""
        return self.ray.get([actor.info.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def __enter__(self) -> ShardedRanker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- ranking ---------------------------------------------------------------------------
    def rank(
        self,
        store: AttentionStore,
        outputs,
        split: str | None = "selection",
        per_text: bool = False,
        chunk_programs: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        impl: str | None = None,
        progress: bool = False,
        on_chunk: Callable[[int, ShardedRanker], None] | None = None,
    ) -> IoUTable:
        """The IoU table of ``outputs`` on ``split``, equal to ``rank(store, outputs, ...)``.

        ``impl`` is fixed when the ranker starts (pass it to the constructor); ``on_chunk``
        is called with (chunks finished, self) after each chunk is merged.
        """
        texts, cells, chunk_programs = self._chunking(store, outputs, split, per_text,
                                                      chunk_programs, memory_budget)
        n_programs, n_heads_total, n_texts = outputs.n_programs, store.n_rows, len(texts)
        failed_all = np.asarray(outputs.failed, dtype=bool)[:, texts]  # [programs, texts]
        iou_mean = torch.zeros(n_programs, n_heads_total, dtype=torch.float32)
        iou_texts = torch.zeros(n_programs, n_heads_total, n_texts, dtype=torch.float32) if per_text else None
        stream = _ChunkStream(self, outputs, split, None if cells is None else texts, chunk_programs,
                              failed_all, per_text)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(stream.starts), desc=f"ranking on {len(self.actors)} shards",
                       unit="chunk", disable=None)
        while stream.finished < len(stream.starts):
            stream.send()
            if stream.receive(iou_mean, iou_texts):  # a chunk is complete
                if bar is not None:
                    bar.update(1)
                if on_chunk is not None:
                    on_chunk(stream.finished, self)
        if bar is not None:
            bar.close()

        impl_used = self.info()[0]["impl"]
        return table_of(store, outputs, split, texts, iou_mean, iou_texts, impl=impl_used,
                        ray={"shards": len(self.actors), "device": self.device,
                             "actors_replaced": self.retries})

    def _chunking(self, store, outputs, split, per_text, chunk_programs, memory_budget):
        """(the split's texts, their cells or None, programs per chunk), the inputs checked."""
        if store is not self.store:
            raise StoreError("this ShardedRanker holds another store's heads: make one per store")
        _check_outputs(store, outputs)
        texts = store.split_indices(split)
        if not texts:
            raise StoreError(f"split {split!r} holds no texts")
        cells, offsets = _split_cells(store, texts)
        if chunk_programs is None:  # the single-process chunks, sized for all heads
            chunk_programs = chunk_size(outputs.n_programs, int(offsets[-1]), store.n_rows,
                                        len(texts), memory_budget, per_text)
        return texts, cells, max(1, int(chunk_programs))

    def _recover(self, shard: int, actor, err: Exception) -> None:
        """Replace a lost shard actor (once, however many of its chunks were in flight)."""
        if self.actors[shard] is not actor:
            return  # already replaced when an earlier chunk of the same actor failed
        self.retries += 1
        if self.retries > self.max_retries:
            raise ClusterError(
                f"lost {self.retries} ranking actors, more than max_retries={self.max_retries} "
                f"(last: {type(err).__name__}); check the cluster's nodes and GPU memory"
            ) from err
        self.actors[shard] = self._start(shard)


class _ChunkStream:
    """One ranking call's program chunks: each put into the object store once, sent to every
    shard, merged as the shards answer, and freed when all have (at most MAX_IN_FLIGHT out)."""

    def __init__(self, ranker: ShardedRanker, outputs, split, texts, chunk_programs: int,
                 failed: np.ndarray, per_text: bool):
        self.ranker, self.outputs, self.split, self.per_text = ranker, outputs, split, per_text
        self.texts = texts  # the texts whose cells outputs.rows reads; None: all
        self.failed = failed  # [programs, texts] on the split's texts
        self.chunk_programs = chunk_programs
        self.starts = list(range(0, outputs.n_programs, chunk_programs))
        self.chunks: dict[int, list] = {}  # chunk -> [p0, p1, values ref, failed, shards left]
        self.pending: dict = {}  # result ref -> (chunk, shard, actor it went to)
        self.next_chunk, self.finished = 0, 0

    def send(self) -> None:
        """Send new chunks to every shard while fewer than MAX_IN_FLIGHT are out."""
        ray, n_shards = self.ranker.ray, len(self.ranker.actors)
        while self.next_chunk < len(self.starts) and len(self.chunks) < MAX_IN_FLIGHT:
            p0 = self.starts[self.next_chunk]
            p1 = min(self.outputs.n_programs, p0 + self.chunk_programs)
            # streamed outputs compute these rows only now, on the split's texts only
            values = self.outputs.rows(p0, p1, texts=self.texts)
            ref = ray.put(np.ascontiguousarray(values, dtype=np.float32))
            self.chunks[self.next_chunk] = [p0, p1, ref, self.failed[p0:p1], n_shards]
            for shard in range(n_shards):
                self.submit(self.next_chunk, shard)
            self.next_chunk += 1

    def submit(self, chunk: int, shard: int) -> None:
        _, _, values_ref, failed, _ = self.chunks[chunk]
        actor = self.ranker.actors[shard]
        result = actor.score.remote(self.split, values_ref, failed, self.per_text)
        self.pending[result] = (chunk, shard, actor)

    def receive(self, iou_mean: torch.Tensor, iou_texts: torch.Tensor | None) -> bool:
        """Copy the next shard answer into place (or resend it to a replacement for a lost
        actor); True when it was the chunk's last."""
        ray = self.ranker.ray
        [done], _ = ray.wait(list(self.pending), num_returns=1)
        chunk, shard, actor = self.pending.pop(done)
        try:
            mean, per = ray.get(done)
        except ray.exceptions.RayActorError as err:
            self.ranker._recover(shard, actor, err)
            self.submit(chunk, shard)  # only the lost chunk goes again, to the new actor
            return False
        p0, p1 = self.chunks[chunk][:2]
        h0, h1 = self.ranker.bounds[shard]
        iou_mean[p0:p1, h0:h1] = mean
        if iou_texts is not None:
            iou_texts[p0:p1, h0:h1] = per
        self.chunks[chunk][4] -= 1
        if self.chunks[chunk][4] != 0:
            return False
        del self.chunks[chunk]  # every shard has it: free the chunk's rows
        self.finished += 1
        return True


def rank_on_ray(store: AttentionStore, outputs, split: str | None = "selection",
                heldout_split: str | None = None, *, address: str = "auto", device: str = "auto",
                shards: int | None = None, impl: str = "auto", **rank_kwargs) -> IoUTable:
    """:func:`rank` (or :func:`rank_with_heldout` when ``heldout_split`` is given) on a cluster.

    ``rank_kwargs`` go to :meth:`ShardedRanker.rank` (``per_text``, ``chunk_programs``,
    ``memory_budget``, ``progress``).
    """
    rank_kwargs.pop("impl", None)
    with ShardedRanker(store, address=address, device=device, shards=shards, impl=impl) as ranker:
        if heldout_split:
            return rank_with_heldout(store, outputs, split=split, heldout_split=heldout_split,
                                     ranker=ranker.rank, **rank_kwargs)
        return ranker.rank(store, outputs, split=split, **rank_kwargs)
