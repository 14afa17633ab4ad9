"""Pure and filesystem-level pieces: config checks, manifest, commit protocol, scan, retention, journal."""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path

import pytest

from configs.checkpoint_config import CheckpointConfig, S3Config, check
from checkpointing.manifest import (FileEntry, HashingWriter, Manifest, ManifestError, crc32_combine, file_entry,
                                    read_manifest)
from checkpointing.journal import Journal
from checkpointing.preflight import check_compatible, check_writable
from checkpointing.store import CheckpointStore, StorageUnavailable, step_name
from tests.compose import compose_root


def problems(cfg: CheckpointConfig) -> dict[str, str]:
    found: dict[str, str] = {}
    check(cfg, lambda field, value, fix: found.setdefault(field, fix))
    return found


@pytest.mark.parametrize("cfg,field,text", [
    (CheckpointConfig(save_interval=-1), "checkpoint.save_interval", ">= 0"),
    (CheckpointConfig(keep_last=0), "checkpoint.keep_last", ">= 1"),
    (CheckpointConfig(optimizer_format="zero"), "checkpoint.optimizer_format", "dp_reshardable"),
    (CheckpointConfig(dir="s3://b/x"), "checkpoint.dir", "shared filesystem"),
    (CheckpointConfig(enabled=True, s3=S3Config(bucket="s3://b/p")), "checkpoint.s3.bucket", "bucket name only"),
    (CheckpointConfig(enabled=True, s3=S3Config(bucket="Bad_Bucket")), "checkpoint.s3.bucket", "not a valid"),
    (CheckpointConfig(enabled=False, s3=S3Config(bucket="ok-bucket")), "checkpoint.s3.bucket", "checkpoint.enabled"),
    (CheckpointConfig(enabled=True, s3=S3Config(bucket="ok-bucket", prefix="/abs")), "checkpoint.s3.prefix", "relative"),
    (CheckpointConfig(enabled=True, s3=S3Config(bucket="ok-bucket", prefix="a/../b")), "checkpoint.s3.prefix", ".."),
    (CheckpointConfig(enabled=True, s3=S3Config(bucket="ok-bucket", part_size_mb=1)), "checkpoint.s3.part_size_mb",
     "between 5"),
    (CheckpointConfig(enabled=True, s3=S3Config(bucket="ok-bucket", region="mars")), "checkpoint.s3.region", "region"),
    (CheckpointConfig(enabled=True, s3=S3Config(bucket="ok-bucket", endpoint_url="localhost:9000")),
     "checkpoint.s3.endpoint_url", "http"),
])
def test_config_problems_name_the_field(cfg: CheckpointConfig, field: str, text: str) -> None:
    found = problems(cfg)
    assert field in found and text in found[field], found


def test_good_config_has_no_problems() -> None:
    assert problems(CheckpointConfig(enabled=True, dir="/fsx/ck", save_interval=100, s3=S3Config(
        bucket="my-ckpts", prefix="runs/llama/", region="us-west-2", endpoint_url="http://127.0.0.1:9000"))) == {}


def test_yaml_defaults_match_schema() -> None:
    root = compose_root()
    assert root.checkpoint == CheckpointConfig()  # configs/checkpoint/default.yaml == the dataclass defaults


def test_credentials_are_not_a_config_field() -> None:
    from tests.compose import compose_raw
    from configs.loading import to_root
    from configs.errors import ConfigError

    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(compose_raw(), resolve=True)
    raw["checkpoint"]["s3"]["aws_secret_access_key"] = "x"  # type: ignore[index]
    with pytest.raises(ConfigError, match="aws_secret_access_key"):
        to_root(raw)  # type: ignore[arg-type]


def test_crc32_combine_matches_zlib() -> None:
    a, b = os.urandom(70_001), os.urandom(5 << 20)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b""), 0) == zlib.crc32(a)


def test_hashing_writer_sees_what_torch_save_writes(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "t.pt"
    with open(path, "wb") as raw:
        stream = HashingWriter(raw)
        torch.save(torch.arange(1000), stream)
        stream.write(b"tail")
    assert stream.entry() == file_entry(path)
    assert torch.load(io.BytesIO(path.read_bytes()[:-4])).sum() == 499500


def manifest_for(directory: Path, step: int) -> Manifest:
    files = {p.name: file_entry(p) for p in directory.iterdir() if p.is_file()}
    return Manifest(step=step, files=files, consumed_samples=step * 8, model={"hidden_size": 64},
                    layout={"tp": 1}, training={"global_batch_size": 8})


def commit_step(store: CheckpointStore, step: int, payload: bytes = b"data") -> Path:
    tmp = Path(store.prepare(step))
    (tmp / "__0_0.distcp").write_bytes(payload * 100)
    (tmp / "common.pt").write_bytes(b"common")
    return Path(store.commit(step, manifest_for(tmp, step)))


def test_commit_renames_and_points_latest(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    path = commit_step(store, 4)
    assert path.name == step_name(4) and not (tmp_path / f"{step_name(4)}.tmp").exists()
    assert (tmp_path / "latest").read_text().strip() == step_name(4) and store.read_latest() == 4
    manifest = read_manifest(path)
    assert manifest.files["__0_0.distcp"] == FileEntry(400, f"{zlib.crc32(b'data' * 100):08x}")
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_scan_skips_partial_and_corrupt_steps_with_a_line(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    commit_step(store, 2)
    commit_step(store, 4)
    truncated = commit_step(store, 6)
    (truncated / "__0_0.distcp").write_bytes(b"short")  # torn write after commit
    corrupt = commit_step(store, 8)
    (corrupt / "__0_0.distcp").write_bytes(b"DATA" * 100)  # same size, other bytes
    (tmp_path / step_name(10)).mkdir()  # no manifest
    (tmp_path / step_name(10) / "__0_0.distcp").write_bytes(b"x")
    Path(store.prepare(12))  # a save killed while writing
    wrong = commit_step(store, 14)
    os.rename(wrong, tmp_path / step_name(16))  # a manifest naming another step
    lines: list[str] = []
    assert store.newest_valid(checksums=False, say=lines.append).step == 8  # sizes only
    lines.clear()
    found = store.newest_valid(checksums=True, say=lines.append)
    assert found is not None and found.step == 4
    text = "\n".join(lines)
    assert "step_00000016: manifest.json names step 14" in text
    assert "step_00000010: no manifest.json" in text
    assert "step_00000008: __0_0.distcp: crc32" in text
    assert "step_00000006: __0_0.distcp: 5 bytes, manifest says 400" in text
    assert "step_00000012" not in text  # temporary directories are never candidates
    assert store.leftovers() == [f"{step_name(12)}.tmp"]


def test_manifest_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="malformed"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ManifestError, match="unknown manifest format"):
        read_manifest(tmp_path)


def test_retention_deletes_only_behind_a_newer_safe_copy(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    for step in (2, 4, 6, 8):
        commit_step(store, step)
    (tmp_path / step_name(10)).mkdir()  # an invalid directory never counts as the newer copy
    say: list[str] = []
    assert store.prune(2, replicated=set(), say=say.append) == []  # nothing replicated yet
    assert store.prune(2, replicated={2}, say=say.append) == []  # nothing older than the replicated one
    assert store.prune(2, replicated={4}, say=say.append) == [2]
    assert store.committed_steps() == [10, 8, 6, 4]
    assert store.prune(1, replicated={4, 6}, say=say.append) == [4]
    assert store.prune(1, replicated=None, say=say.append) == [6]  # no replication: newest commit is safe
    assert store.committed_steps() == [10, 8]
    assert not list(tmp_path.glob("*.deleting"))


def test_journal_replays_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "replication" / "journal.jsonl"
    journal = Journal(path)
    journal.record("mpu", step=4, name="a", upload_id="u1", part_size=5 << 20, checksum_type="FULL_OBJECT")
    journal.record("mpu", step=4, name="b", upload_id="u2", part_size=5 << 20, checksum_type="FULL_OBJECT")
    journal.record("mpu_done", step=4, name="a")
    journal.record("verified", step=4, name="a", crc32="0000abcd")
    with open(path, "a") as handle:
        handle.write('{"ev": "verified", "step": 4, "na')  # killed mid-write
    again = Journal(path)
    assert again.uploads == {(4, "b"): {"upload_id": "u2", "part_size": 5 << 20, "checksum_type": "FULL_OBJECT"}}
    assert again.verified == {(4, "a"): "0000abcd"}
    again.record("forget", step=4)
    assert Journal(path).uploads == {} and Journal(path).verified == {}


def test_unwritable_dir_names_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    found: list[tuple[str, object, str]] = []
    check_writable(str(blocker / "ckpt"), lambda f, v, fix: found.append((f, v, fix)))
    assert found and found[0][0] == "checkpoint.dir" and "not writable" in found[0][2]


def test_incompatible_model_names_the_field() -> None:
    from checkpointing.signature import model_signature

    cfg = compose_root()
    saved = model_signature(cfg.model)
    manifest = Manifest(step=6, files={}, consumed_samples=48, model={**saved, "hidden_size": 32}, layout={},
                        training={"global_batch_size": cfg.training.global_batch_size * 2})
    found: list[tuple[str, object, str]] = []
    check_compatible(("/ck/step_00000006", manifest), cfg, lambda f, v, fix: found.append((f, v, fix)))
    fields = {f: fix for f, _, fix in found}
    assert "hidden_size=32" in fields["model.hidden_size"] and "new directory" in fields["model.hidden_size"]
    assert "training.global_batch_size" in fields


def test_periodic_dp_reshardable_checkpoint_refuses_another_tp() -> None:
    from checkpointing.signature import layout_signature, model_signature

    cfg = compose_root()
    saved_layout = {**layout_signature(cfg, 2, 1), "tp": 2, "distributed_optimizer": True}
    periodic = Manifest(step=4, files={}, consumed_samples=32, model=model_signature(cfg.model), layout=saved_layout,
                        optimizer_format="dp_reshardable")
    found: list[tuple[str, object, str]] = []
    check_compatible(("/ck/step_00000004", periodic), cfg, lambda f, v, fix: found.append((f, v, fix)))
    assert [f for f, _, _ in found] == ["parallelism.tp"]
    assert "parallelism.tp=2" in found[0][2] and "fully_reshardable" in found[0][2]
    reshardable = Manifest(step=4, files={}, consumed_samples=32, model=model_signature(cfg.model),
                           layout=saved_layout, optimizer_format="fully_reshardable")
    found.clear()
    check_compatible(("/ck/step_00000004", reshardable), cfg, lambda f, v, fix: found.append((f, v, fix)))
    assert found == []
    assert Manifest.from_json(periodic.to_json()).optimizer_format == "dp_reshardable"


def test_journal_is_bound_to_one_s3_location(tmp_path: Path) -> None:
    path = tmp_path / "replication" / "journal.jsonl"
    journal = Journal(path)
    assert journal.start_for("aws s3://a/run1") is None  # a new journal: nothing to drop
    journal.record("verified", step=4, name="__0_0.distcp", crc32="0badf00d")
    again = Journal(path)
    assert again.location == "aws s3://a/run1" and again.start_for("aws s3://a/run1") is None
    assert (4, "__0_0.distcp") in again.verified  # same location: resumes
    assert again.start_for("aws s3://a/run2") == "aws s3://a/run1"  # moved: verified-there means nothing here
    assert again.verified == {} and Journal(path).verified == {} and Journal(path).location == "aws s3://a/run2"


# ------------------------------------------------------------------------- storage that cannot be read


def test_a_missing_parent_is_an_unmounted_filesystem_not_a_new_directory(tmp_path: Path) -> None:
    """/fsx not mounted: /fsx/checkpoints/run must not be created on the local disk and trained into."""
    found: list[tuple[str, object, str]] = []
    check_writable(str(tmp_path / "fsx" / "checkpoints" / "run"), lambda f, v, fix: found.append((f, v, fix)))
    assert [f for f, _, _ in found] == ["checkpoint.dir"] and "mounted" in found[0][2], found
    assert not (tmp_path / "fsx").exists()
    found.clear()
    check_writable(str(tmp_path / "ckpt"), lambda f, v, fix: found.append((f, v, fix)))  # parent exists: created
    assert found == [] and (tmp_path / "ckpt").is_dir()


def test_a_directory_that_cannot_be_listed_is_not_an_empty_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    store = CheckpointStore(str(tmp_path))
    for step in (2, 4, 6):
        commit_step(store, step)

    def eio(path: object) -> list[str]:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr("checkpointing.store.os.listdir", eio)
    with pytest.raises(StorageUnavailable, match="cannot list the checkpoint directory .*Input/output error"):
        store.newest_valid(say=lambda _l: None)
    lines: list[str] = []
    assert store.prune(1, replicated=None, say=lines.append) == []  # retention never runs blind
    assert "retention skipped" in lines[0]
    monkeypatch.undo()
    assert store.committed_steps() == [6, 4, 2]


def test_a_manifest_that_cannot_be_read_stops_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO on the newest manifest: not "skip to an older step" (or to none), and not pruned."""
    import errno

    store = CheckpointStore(str(tmp_path))
    for step in (2, 4):
        commit_step(store, step)
    read_text = Path.read_text

    def flaky(self: Path, *args: object, **kwargs: object) -> str:
        if self.parent.name == step_name(4) and self.name == "manifest.json":
            raise OSError(errno.EIO, "Input/output error", str(self))
        return read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", flaky)
    with pytest.raises(StorageUnavailable, match="step_00000004: cannot read manifest.json"):
        store.newest_valid(say=lambda _l: None)
    assert store.prune(1, replicated=None, say=lambda _l: None) == []
    monkeypatch.undo()
    assert store.committed_steps() == [4, 2]


# ------------------------------------------------------------------------- the fault-injection hook


def test_the_hook_is_inert_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from checkpointing import hooks

    monkeypatch.delenv(hooks.ENV, raising=False)
    monkeypatch.setattr(hooks, "_loaded", None)
    hooks.check()
    hooks.at("write_data", 3)  # nothing imported, nothing called
    calls: list[tuple[str, int]] = []
    import types
    import sys

    module = types.ModuleType("recording_hook_for_test")
    module.record = lambda phase, step: calls.append((phase, step))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "recording_hook_for_test", module)
    monkeypatch.setenv(hooks.ENV, "recording_hook_for_test:record")
    hooks.at("rename", 7)
    assert calls == [("rename", 7)]


@pytest.mark.parametrize("value,text", [
    ("just_a_module", "expected module:function"),
    ("no_such_module_xyz:at_phase", "cannot import no_such_module_xyz"),
    ("json:no_such_function", "json has no function no_such_function"),
    ("json:__doc__", "json has no function __doc__"),
])
def test_a_malformed_hook_is_a_clear_error_at_start_up(value: str, text: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from checkpointing import hooks
    from checkpointing.preflight import preflight
    from configs.errors import ConfigError

    monkeypatch.setenv(hooks.ENV, value)
    with pytest.raises(hooks.HookError, match=text):
        hooks.check()
    cfg = compose_root()
    cfg.checkpoint.enabled, cfg.checkpoint.dir = True, str(tmp_path / "ckpt")
    with pytest.raises(ConfigError) as info:
        preflight(cfg, rank=1)
    assert f"{hooks.ENV} = {value!r}" in str(info.value) and text in str(info.value)


def test_the_pause_hook_checks_its_own_setting_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from checkpointing import hooks

    monkeypatch.delitem(sys.modules, "ckpt_pause_hook", raising=False)
    monkeypatch.setenv(hooks.ENV, "ckpt_pause_hook:at_phase")
    monkeypatch.setenv("CKPT_TEST_PAUSE", "write_data@three")
    monkeypatch.setattr(hooks, "_loaded", None)
    with pytest.raises(hooks.HookError, match="write_data@three"):
        hooks.check()
