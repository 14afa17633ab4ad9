"""``checkpoint.export_hf=true``: the final step in Hugging Face format, in the run directory and in S3.

Runs on rank 0 after the process group is gone (trainer.callbacks ``after_shutdown``), so a long
export never keeps the other ranks in a collective that could time out. The export reads the
committed step offline (checkpointing.export_hf), writes ``<run dir>/hf_export`` atomically and,
with S3 replication on, uploads it under ``<prefix>/hf_export/step_XXXXXXXX/``. A failure is
reported with the command that redoes it and fails the job: the checkpoint itself is committed
and safe, but nobody should believe an export exists that does not.
"""

from __future__ import annotations

import os
import shlex
from typing import Callable

from checkpointing.export_hf import ExportError, export_step
from checkpointing.preflight import RUN_DIR_ENV
from checkpointing.signature import tokenizer_dir
from configs.checkpoint_config import parse_size
from configs.schema import RootConfig

EXPORT_DIR = "hf_export"


class ExportFailed(RuntimeError):
    """The final export (or its upload) failed; the checkpoint it was made from is committed."""


def export_final_step(cfg: RootConfig, step_dir: str, step: int, say: Callable[[str], None]) -> str:
    ck = cfg.checkpoint
    run_dir = os.environ.get(RUN_DIR_ENV) or os.path.dirname(os.path.abspath(step_dir))
    output = os.path.join(run_dir, EXPORT_DIR)
    redo = (f"python -m checkpointing.export_hf --checkpoint {shlex.quote(step_dir)} --output {shlex.quote(output)} "
            f"--dtype {ck.export_dtype} --max-shard-size {ck.export_max_shard_size} --overwrite")
    say(f"export: writing step {step} to {output} (Hugging Face, {ck.export_dtype})")
    try:
        report = export_step(step_dir, output, dtype=ck.export_dtype,
                             max_shard_bytes=parse_size(ck.export_max_shard_size) or 5 * 10**9, model=cfg.model,
                             tokenizer=tokenizer_dir(cfg), run_dir=run_dir, overwrite=True, say=say)
    except (ExportError, OSError) as exc:
        raise ExportFailed(f"the Hugging Face export of step {step} failed: {exc}; the checkpoint {step_dir} is "
                           f"committed; redo the export with: {redo}") from None
    say(f"export: {report.tensors} tensors, {report.total_size / 2**30:.2f} GiB in {len(report.weight_files)} "
        f"file(s), {report.seconds:.1f} s -> {output}")
    if ck.replicated:
        from checkpointing.export_upload import export_s3_prefix, upload_export

        try:
            upload_export(output, ck.s3, step, say=say)
        except Exception as exc:  # boto errors, verification: the local export stands
            raise ExportFailed(f"the export {output} could not be uploaded to S3 ({exc}); it is complete locally") \
                from None
        say(f"export: uploaded to s3://{ck.s3.bucket}/{export_s3_prefix(ck.s3, step)}")
    return output
