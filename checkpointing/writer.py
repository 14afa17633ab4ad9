"""Asynchronous distributed save: megatron-core's torch_dist format, our staging, writing and commit.

The training thread blocks only for :meth:`CheckpointWriter.start`: megatron's save planning
(cached after the first save), rank 0's small ``common.pt``, and staging — copying every tensor
that aliases live training memory into reusable host buffers (pinned on GPUs). One background
thread per rank then writes the ``.distcp`` files (CRC-32 computed on the way out, fsync per
file) and joins the commit over a dedicated gloo group, so checkpoint collectives never share a
communicator or a thread with training:

1. every rank reports (ok, error, DCP write results, file sizes and CRCs) to rank 0 (gather);
2. rank 0 writes DCP's ``.metadata`` and ``metadata.json``, fsyncs them and ``common.pt``, writes
   the manifest, renames ``step_N.tmp`` to ``step_N`` and updates ``latest`` — only if every
   rank succeeded;
3. rank 0 tells every rank the outcome (broadcast).

At most one save is in flight: :meth:`start` requires the previous one to be collected.
megatron's own async machinery (``AsyncCallsQueue``) is not used: it forks writer processes
and finalizes with collectives on the training process group.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint.filesystem import _write_item

from checkpointing import hooks
from checkpointing.manifest import FileEntry, HashingWriter, Manifest, file_entry, fsync_file
from checkpointing.store import CheckpointStore

try:  # torch >= 2.6 asks which serialization to use; megatron's format is torch.save per item
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    _WRITE_KWARGS: dict[str, Any] = {"serialization_format": SerializationFormat.TORCH_SAVE}
except ImportError:  # pragma: no cover
    _WRITE_KWARGS = {}


@dataclass(frozen=True)
class SaveOutcome:
    step: int
    committed: bool
    path: Optional[str]
    error: Optional[str]
    blocking_s: float  # what the training loop waited for (planning + staging)
    background_s: float  # writing + commit, overlapped with training
    total_bytes: int
    kind: str = ""  # what start() was told (the optimizer format)


class _CapturingStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist save planning, with the write and finalize steps handed back to us."""

    captured: Optional[tuple[Any, Any]] = None

    def _get_save_and_finalize_callbacks(self, writer: Any, save_state_dict_ret: Any) -> AsyncRequest:
        self.captured = (writer, save_state_dict_ret[1])  # the storage writer, DCP global metadata
        return AsyncRequest(None, (), [])


class HostStager:
    """Copies what aliases live training memory into host buffers reused from save to save."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._pin = torch.cuda.is_available()

    def stage(self, buckets: list[Any], live: set[int]) -> tuple[list[Any], int]:
        staged, index, copied = [], 0, 0
        for path, name, (bytes_data, tensor_data) in buckets:
            tensors = []
            for item, tensor in tensor_data:
                if tensor.device.type != "cpu" or tensor.untyped_storage().data_ptr() in live:
                    buffer = self._buffer(index, tensor)
                    buffer.copy_(tensor, non_blocking=True)
                    tensors.append((item, buffer))
                    index += 1
                    copied += tensor.numel() * tensor.element_size()
                else:  # built for this save (e.g. the gathered optimizer state): nobody else writes it
                    tensors.append((item, tensor))
            staged.append((path, name, (bytes_data, tensors)))
        if self._pin:
            torch.cuda.synchronize()
        return staged, copied

    def _buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        if index < len(self._buffers):
            buffer = self._buffers[index]
            if buffer.shape == like.shape and buffer.dtype == like.dtype:
                return buffer
        buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self._pin)
        if index < len(self._buffers):
            self._buffers[index] = buffer
        else:
            self._buffers.append(buffer)
        return buffer

    def release(self) -> None:
        self._buffers.clear()


def live_storages(model: list[Any], optimizer: Any) -> set[int]:
    """Storage addresses of parameters, buffers and optimizer state: what training mutates."""
    ptrs: set[int] = set()
    tensors: list[torch.Tensor] = []
    for chunk in model:
        tensors += list(torch.nn.Module.parameters(chunk)) + list(torch.nn.Module.buffers(chunk))
    for member in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(member, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            tensors += list(group["params"])
        for per_param in inner.state.values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        ptrs.add(tensor.untyped_storage().data_ptr())
    return ptrs


class CheckpointWriter:
    """Saves this rank's share of each checkpoint; one save in flight; collectives on ``group``."""

    def __init__(self, store: CheckpointStore, group: Any, *, write_threads: int, parallel_group: Any = None,
                 after_commit: Optional[Callable[[int], None]] = None):
        self.store = store
        self.group = group
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.write_threads = write_threads
        self.after_commit = after_commit  # rank 0, background thread, after a commit (e.g. retention)
        self.parallel_group = parallel_group
        # one planning cache per kind of state dict (e.g. the optimizer format): a cached plan is only
        # valid for the same keys and shapes
        self._strategies: dict[str, tuple[_CapturingStrategy, Any]] = {}
        # megatron collects results of its forked writers through a multiprocessing Manager queue;
        # our writers are threads of this process, so an in-process queue stands in (nothing spawned)
        if getattr(filesystem_async, "_results_queue", None) is None:
            filesystem_async._results_queue = queue.Queue()  # type: ignore[attr-defined]
        self._stager = HostStager()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._inflight: Optional[Future[SaveOutcome]] = None

    def _strategy(self, kind: str) -> tuple[_CapturingStrategy, Any, bool]:
        """(base strategy, strategy to save with, first use) for one kind of state dict."""
        if kind in self._strategies:
            return (*self._strategies[kind], False)
        base = _CapturingStrategy("torch_dist", 1, thread_count=self.write_threads, cached_metadata=True)
        group = self.parallel_group
        # replicas (DP copies) are spread over the data-parallel ranks: everybody writes a share
        strategy: Any = (FullyParallelSaveStrategyWrapper(base, group, do_cache_distribution=True)
                         if group is not None and dist.get_world_size(group) > 1 else base)
        self._strategies[kind] = (base, strategy)
        return base, strategy, True

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None

    def start(self, step: int, sharded_sd: dict[str, Any], manifest_fields: dict[str, Any], *,
              live: set[int], stage: bool = True, blocked_since: Optional[float] = None, kind: str = "") -> None:
        """Collective. Blocks for planning and staging, then writes in the background.

        ``blocked_since``: ``time.perf_counter()`` when the caller stopped training for this save
        (before building ``sharded_sd``), so that ``SaveOutcome.blocking_s`` covers all of it.
        ``kind``: state dicts of one kind share a cached save plan (same keys and shapes).
        """
        if self._inflight is not None:
            raise RuntimeError("a checkpoint save is still in flight; collect it with wait() first")
        t0 = time.perf_counter() if blocked_since is None else blocked_since
        error: Optional[str] = None
        if self.rank == 0:
            try:
                self.store.prepare(step)
            except OSError as exc:
                error = f"cannot create {self.store.tmp_path(step)}: {exc}"
        flag = [error]
        dist.broadcast_object_list(flag, src=0, group=self.group)
        if flag[0] is not None:
            self._inflight = _done(SaveOutcome(step, False, None, flag[0], time.perf_counter() - t0, 0.0, 0, kind))
            return
        tmp = self.store.tmp_path(step)
        base, strategy, first = self._strategy(kind)
        dist_checkpointing.save(sharded_sd, tmp, sharded_strategy=strategy, async_sharded_save=True,
                                validate_access_integrity=first)
        writer, metadata = base.captured or (None, None)
        if writer is None:
            raise RuntimeError("megatron's torch_dist strategy did not hand back its storage writer")
        buckets = list(writer.write_buckets or [])
        copied = 0
        if stage:
            buckets, copied = self._stager.stage(buckets, live)
        blocking = time.perf_counter() - t0
        def write_and_commit() -> SaveOutcome:
            outcome = self._write_and_commit(step, tmp, writer, metadata, buckets, manifest_fields, blocking)
            return replace(outcome, kind=kind)

        self._inflight = self._executor.submit(write_and_commit)

    def poll(self) -> Optional[SaveOutcome]:
        """The outcome once the in-flight save has finished on every rank; never blocks."""
        if self._inflight is None or not self._inflight.done():
            return None
        return self.wait()

    def wait(self) -> Optional[SaveOutcome]:
        if self._inflight is None:
            return None
        future, self._inflight = self._inflight, None
        return future.result()

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        self._stager.release()

    # ------------------------------------------------------------------ background thread
    def _write_and_commit(self, step: int, tmp: str, writer: Any, metadata: Any, buckets: list[Any],
                          manifest_fields: dict[str, Any], blocking: float) -> SaveOutcome:
        t0 = time.perf_counter()
        try:
            results, entries = self._write(step, writer, buckets)
            mine: tuple[Any, ...] = (True, None, results, entries)
        except Exception as exc:  # reported to rank 0: a failed rank fails the whole save
            mine = (False, f"rank {self.rank}: {exc!r}", [], {})
        try:
            gathered: Optional[list[Any]] = [None] * self.world if self.rank == 0 else None
            dist.gather_object(mine, gathered, dst=0, group=self.group)
            outcome: Optional[SaveOutcome] = None
            if gathered is not None:  # rank 0
                outcome = self._commit(step, tmp, writer, metadata, gathered, manifest_fields, blocking, t0)
            box = [outcome]
            dist.broadcast_object_list(box, src=0, group=self.group)
            result = box[0]
            if result is None:
                raise RuntimeError("rank 0 sent no outcome")
            return result
        except Exception as exc:  # a peer died or the group timed out: nothing was committed by us
            return SaveOutcome(step, False, None, f"rank {self.rank}: checkpoint collective failed: {exc!r}",
                               blocking, time.perf_counter() - t0, 0)

    def _write(self, step: int, writer: Any, buckets: list[Any]) -> tuple[list[Any], dict[str, FileEntry]]:
        transforms = getattr(writer, "transforms", None)
        args = [transforms] if transforms is not None else []
        write_item: Any = _write_item  # its signature changed across torch versions (transforms, format)

        def write_file(bucket: Any) -> tuple[list[Any], str, FileEntry]:
            path, name, (bytes_data, tensor_data) = bucket
            results = []
            with open(path, "wb") as raw:
                stream = HashingWriter(raw)
                for item, data in bytes_data:
                    results.append(write_item(*args, stream, data, item, name, **_WRITE_KWARGS))
                for index, (item, tensor) in enumerate(tensor_data):
                    results.append(write_item(*args, stream, tensor, item, name, **_WRITE_KWARGS))
                    if index == 0:
                        hooks.at("write_data", step)  # tests: killed with this file half-written
                raw.flush()
                os.fsync(raw.fileno())
            return results, name, stream.entry()

        if len(buckets) <= 1:
            done = [write_file(b) for b in buckets]
        else:
            with ThreadPoolExecutor(max_workers=len(buckets), thread_name_prefix="ckpt-file") as pool:
                done = list(pool.map(write_file, buckets))
        results = [r for file_results, _, _ in done for r in file_results]
        return results, {name: entry for _, name, entry in done}

    def _commit(self, step: int, tmp: str, writer: Any, metadata: Any, gathered: list[Any],
                manifest_fields: dict[str, Any], blocking: float, t0: float) -> SaveOutcome:
        errors = [g[1] for g in gathered if not g[0]]
        path: Optional[str] = None
        total = 0
        if not errors:
            try:
                writer.finish(metadata, [g[2] for g in gathered])  # DCP's .metadata (fsynced by DCP)
                save_config(CheckpointingConfig("torch_dist", 1), tmp)
                entries: dict[str, FileEntry] = {}
                for g in gathered:
                    entries.update(g[3])
                for name in sorted(os.listdir(tmp)):  # rank 0's own files: common.pt, .metadata, metadata.json
                    if name not in entries:
                        fsync_file(os.path.join(tmp, name))
                        entries[name] = file_entry(os.path.join(tmp, name))
                manifest = Manifest(step=step, files=entries, created_unix=time.time(), **manifest_fields)
                path = self.store.commit(step, manifest)
                total = manifest.total_bytes
            except Exception as exc:
                errors.append(f"rank 0 commit: {exc!r}\n{traceback.format_exc(limit=4)}")
                path = None
        if path is not None and self.after_commit is not None:
            try:
                self.after_commit(step)
            except Exception as exc:  # retention is housekeeping: the commit stands
                print(f"checkpoint: housekeeping after step {step} failed: {exc!r}", flush=True)
        return SaveOutcome(step, path is not None, path, "; ".join(str(e) for e in errors) or None, blocking,
                           time.perf_counter() - t0, total)


def _done(outcome: SaveOutcome) -> Future[SaveOutcome]:
    future: Future[SaveOutcome] = Future()
    future.set_result(outcome)
    return future
