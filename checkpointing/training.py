"""The checkpoint callback for the training loop (see trainer.callbacks).

* ``on_train_start``: resume (newest committed step; from S3 when the shared filesystem has none),
  start the S3 replicator (rank 0), take over SIGTERM/SIGUSR2 (stop after this step, then save);
* ``on_step_end``: collect a finished background save; every ``save_interval`` steps start one
  (the loop blocks only for staging; a save still in flight is waited for first);
* ``on_train_end``: finish the save in flight and save the last step synchronously — also when a
  stop was requested — then let the replicator upload it; after an error: no collectives.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import torch.distributed as dist
from megatron.core import parallel_state

from checkpointing.export_final import export_final_step
from checkpointing.init_weights import InitFromCallback, initialize_from
from checkpointing.preflight import checkpoint_root
from checkpointing.replicator_process import ReplicatorProcess
from checkpointing.resume import choose_step, load
from checkpointing.signature import (data_consumption, layout_signature, model_signature, tokenizer_dir,
                                     training_signature)
from checkpointing.state import DP_RESHARDABLE, FULLY_RESHARDABLE, sharded_state_dict
from checkpointing.status import (SAVE_STATUS_NAME, ReplicationWatch, SaveStatus, read_replication_status,
                                  write_json_atomic)
from checkpointing.store import CheckpointStore, step_name
from checkpointing.writer import CheckpointWriter, SaveOutcome, live_storages
from configs.schema import RootConfig
from monitoring import record_checkpoint
from trainer import control
from trainer.callbacks import StepReport, TrainingCallback, TrainState
from trainer.distributed import Layout

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR2") if hasattr(signal, name))
GROUP_TIMEOUT = timedelta(minutes=30)


class CheckpointError(RuntimeError):
    """The final checkpoint could not be committed."""


def make_callback(cfg: RootConfig, layout: Layout) -> TrainingCallback | None:
    """None while checkpointing is disabled (and nothing is initialised from weights)."""
    if not cfg.checkpoint.enabled:
        return InitFromCallback(cfg.checkpoint.init_from, layout.rank) if cfg.checkpoint.init_from else None
    return CheckpointCallback(cfg, layout)


class CheckpointCallback:
    def __init__(self, cfg: RootConfig, layout: Layout):
        self.cfg = cfg.checkpoint
        self.root_cfg = cfg
        self.layout = layout
        self.store = CheckpointStore(checkpoint_root(self.cfg))
        # collectives of the background save run on their own gloo communicator (and thread)
        self.group = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
        self.save_status = SaveStatus()
        self.replicator: Optional[ReplicatorProcess] = None
        self.replication_watch: Optional[ReplicationWatch] = None
        self.writer: Optional[CheckpointWriter] = None
        self._saved_step: Optional[int] = None  # committed or in flight
        self._saved_format: Optional[str] = None  # its optimizer format
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ callback protocol
    def on_train_start(self, state: TrainState) -> None:
        state.extra["checkpoint"] = self
        self._install_signal_handlers()
        if self.layout.rank == 0:
            self.store.remove_leftovers(say=self._say)
        valid = choose_step(self.store, self.cfg, state, self.group, self._say) if self.cfg.resume else None
        if valid is not None:
            load(state, valid, self._say)
            self._saved_step, self._saved_format = valid.step, valid.manifest.optimizer_format
            self.save_status.resumed_from_step = valid.step
            self.save_status.last_committed_step = valid.step
            if self.cfg.init_from:
                self._say(f"checkpoint: checkpoint.init_from={self.cfg.init_from} ignored: the run resumed from its "
                          f"own checkpoint ({step_name(valid.step)})")
        elif self.cfg.init_from:
            initialize_from(state, self.cfg.init_from, self._say)
        if self.layout.rank == 0 and self.cfg.replicated:
            self.replicator = ReplicatorProcess(self.store.root, self.cfg, self._say)
            self.replication_watch = ReplicationWatch(self.store.root)
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.writer = CheckpointWriter(self.store, self.group, write_threads=self.cfg.write_threads,
                                       parallel_group=dp_group,
                                       after_commit=None if self.cfg.replicated else self._prune)

    def on_step_end(self, state: TrainState, report: StepReport) -> None:
        outcome = self._writer().poll()
        if outcome is not None:
            self._record(outcome)
        self._report_replication()
        interval = self.cfg.save_interval
        if interval and state.step % interval == 0 and state.step < state.total_steps:
            self._save(state, blocking=not self.cfg.async_save)

    def on_validation(self, state: TrainState, report: Any) -> None:
        pass

    def after_shutdown(self, state: TrainState, *, finished: bool) -> None:
        """Rank 0, training finished: export the final step to Hugging Face format (checkpoint.export_hf)."""
        if not (finished and self.cfg.export_hf and self.layout.rank == 0 and self._saved_step == state.step):
            return
        state.beat("export")
        export_final_step(self.root_cfg, self.store.path(state.step), state.step, self._say)
        state.beat("finished")

    def on_train_end(self, state: TrainState, *, finished: bool, error: Optional[BaseException] = None) -> None:
        self._restore_signal_handlers()
        if error is not None:  # peers may be gone: no collectives, nothing waited for
            if self.replicator is not None:
                self.replicator.stop(grace_s=2.0)
            return
        writer = self._writer()
        outcome = self._wait_in_flight(state.step)
        if outcome is not None:
            self._record(outcome)
        final: Optional[SaveOutcome] = None
        reshardable = self._saved_format == self._optimizer_format(final=True)
        if self._saved_step != state.step or not reshardable:  # the last step, in the format any layout loads
            final = self._save(state, blocking=True, final=True)
        writer.close()
        if self.replicator is not None:
            if finished:
                timeout = self.cfg.s3.final_upload_timeout_s
                self._say(f"checkpoint: waiting up to {timeout} s for S3 to have {step_name(state.step)}")
                if not self.replicator.drain(timeout):
                    self._say(f"checkpoint: S3 replication of {step_name(state.step)} did not finish; the next run "
                              "(or `python -m checkpointing.replicate once`) continues it from the journal")
            else:
                self.replicator.stop()
            self._report_replication()
        if final is not None and not final.committed:
            raise CheckpointError(f"the final checkpoint ({step_name(state.step)}) was not committed: {final.error}")

    # ------------------------------------------------------------------ status for monitoring
    def status(self) -> dict[str, Any]:
        """Save counters, and on rank 0 the replicator's (see checkpointing.status)."""
        replication = read_replication_status(self.store.root) if self.cfg.replicated else None
        return {"save": asdict(self.save_status), "replication": asdict(replication) if replication else None}

    # ------------------------------------------------------------------ saving
    def _optimizer_format(self, *, final: bool) -> str:
        fmt = self.cfg.optimizer_format
        if fmt != "auto":
            return fmt
        return FULLY_RESHARDABLE if final else DP_RESHARDABLE

    def _save(self, state: TrainState, *, blocking: bool, final: bool = False) -> Optional[SaveOutcome]:
        """``final``: the end-of-training or stop save (what a resume on another layout starts from)."""
        writer = self._writer()
        previous = self._wait_in_flight(state.step)
        if previous is not None:
            self._record(previous)
        blocked_since = time.perf_counter()  # training is stopped from here on, until start() returns
        state.beat("checkpoint")
        par = self.root_cfg.parallelism
        sharded_params = parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1
        if par.distributed_optimizer and par.overlap_param_gather and sharded_params:
            for chunk in state.model:  # the step's updated shards are otherwise gathered at the next forward
                chunk.start_param_sync(force_sync=True)
        optimizer_format = self._optimizer_format(final=final)
        manifest_fields = {
            "consumed_samples": state.consumed_samples,
            "model": model_signature(self.root_cfg.model),
            "layout": layout_signature(self.root_cfg, self.layout.world_size, self.layout.dp_size),
            "training": training_signature(self.root_cfg),
            "optimizer_format": optimizer_format,
            "model_config": asdict(self.root_cfg.model),
            "tokenizer": tokenizer_dir(self.root_cfg),
            "data": data_consumption(state),
        }
        writer.start(state.step, sharded_state_dict(state, optimizer_format=optimizer_format), manifest_fields,
                          live=live_storages(state.model, state.optimizer), stage=not blocking,
                          blocked_since=blocked_since, kind=optimizer_format)
        self._saved_step, self._saved_format = state.step, optimizer_format
        if not blocking:
            state.beat("step_end")
            return None
        outcome = writer.wait()
        state.beat("step_end")
        if outcome is None:
            raise RuntimeError("the synchronous save left no outcome")
        self._record(outcome, synchronous=True)
        return outcome

    def _wait_in_flight(self, step: int) -> Optional[SaveOutcome]:
        writer = self._writer()
        if not writer.in_flight:
            return None
        t0 = time.perf_counter()
        outcome = writer.wait()
        waited = time.perf_counter() - t0
        self.save_status.waited_for_previous_s_total += waited
        if waited > 0.5 and self.layout.rank == 0 and outcome is not None:
            self._say(f"checkpoint: waited {waited:.1f} s for the save of {step_name(outcome.step)} before step "
                      f"{step}'s (a save takes longer than checkpoint.save_interval steps)")
        return outcome

    def _writer(self) -> CheckpointWriter:
        if self.writer is None:
            raise RuntimeError("on_train_start has not run: no checkpoint writer")
        return self.writer

    def _report_replication(self) -> None:
        """Rank 0: the replicator's progress (another process) as monitoring events."""
        if self.replication_watch is None:
            return
        for event in self.replication_watch.poll():
            record_checkpoint("replication", event.step, event.seconds, ok=event.ok, size_bytes=event.size_bytes,
                              error=event.error)

    def _record(self, outcome: SaveOutcome, *, synchronous: bool = False) -> None:
        # every rank: its own stall and the save's outcome (a per-rank exporter shows both);
        # a synchronous save (the final one, or async_save=false) stalls training for all of it
        stalled = outcome.blocking_s + (outcome.background_s if synchronous else 0.0)
        record_checkpoint("blocking", outcome.step, stalled)
        record_checkpoint("save", outcome.step, outcome.blocking_s + outcome.background_s, ok=outcome.committed,
                          size_bytes=outcome.total_bytes if outcome.committed else None, error=outcome.error)
        status = self.save_status
        status.saves_total += 1
        status.last_blocking_s = round(stalled, 4)
        status.last_background_s = round(0.0 if synchronous else outcome.background_s, 4)
        status.updated_unix = time.time()
        if outcome.committed:
            status.last_committed_step = outcome.step
            status.last_bytes = outcome.total_bytes
            status.last_error = None
            if self.layout.rank == 0:
                how = ("synchronous save" if synchronous
                       else f"background {outcome.background_s:.2f} s")
                self._say(f"checkpoint: committed {outcome.path} ({outcome.total_bytes / 2**20:.1f} MiB, "
                          f"{outcome.kind} optimizer state; training blocked {status.last_blocking_s:.3f} s, {how})")
                if self.replicator is not None:
                    self.replicator.committed(outcome.step)
        else:
            status.save_failures_total += 1
            status.last_error = outcome.error
            if self._saved_step == outcome.step:
                self._saved_step, self._saved_format = status.last_committed_step, None
            if self.layout.rank == 0:
                self._say(f"checkpoint: save of {step_name(outcome.step)} FAILED, training continues: {outcome.error}")
        if self.layout.rank == 0:
            write_json_atomic(Path(self.store.root, SAVE_STATUS_NAME), asdict(status))

    def _prune(self, step: int) -> None:
        self.store.prune(self.cfg.keep_last, replicated=None, say=self._say)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        for sig in STOP_SIGNALS:
            try:
                self._previous_handlers[sig] = signal.signal(sig, self._on_stop_signal)
            except ValueError:  # not the main thread (embedded use): the control file still works
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_stop_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        first = not control.stop_was_requested()
        control.request_stop()
        if first and self.layout.rank == 0:
            name = signal.Signals(signum).name
            print(f"checkpoint: {name} received: saving after this step, then stopping", file=sys.stderr, flush=True)

    def _say(self, line: str) -> None:
        if self.layout.rank == 0:
            print(line, flush=True)
