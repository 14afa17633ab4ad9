"""Fast unit tests: hostlists, time limits, layout rules, run directories."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.hostlist import expand_hostlist
from launcher.rundir import create_run_dir, new_run_dir_path
from configs.derived import derived_dp, parse_time_limit, train_steps
from configs.errors import ConfigError
from configs.validate import validate
from tests.compose import compose_root


@pytest.mark.parametrize("text,hosts", [
    ("node1", ["node1"]),
    ("ip-10-1-[2-4,07],login1", ["ip-10-1-2", "ip-10-1-3", "ip-10-1-4", "ip-10-1-07", "login1"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
])
def test_hostlist(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@given(st.lists(st.integers(0, 999), min_size=1, max_size=20, unique=True))
def test_hostlist_roundtrip(nums: list[int]) -> None:
    text = "n[" + ",".join(str(n) for n in nums) + "]"
    assert expand_hostlist(text) == [f"n{n}" for n in nums]


def test_hostlist_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        expand_hostlist("n[1-")


@pytest.mark.parametrize("text,seconds", [("04:00:00", 14400), ("2-00:00:00", 172800), ("90", 5400),
                                          ("1:61:00", None), ("forever", None)])
def test_time_limit(text: str, seconds: int | None) -> None:
    assert parse_time_limit(text) == seconds


def test_presets_are_valid_and_dp_is_derived() -> None:
    root = compose_root("config=llama3_70b_p5", "cluster.nodes=32")
    assert derived_dp(root) == 8  # 256 GPUs / (TP8 x PP4)
    assert train_steps(root) == 10**12 // (1024 * 8192)
    assert root.model.num_layers == 80 and root.model.num_query_groups == 8 and not root.model.tie_embeddings
    tiny = compose_root()
    assert tiny.cluster.kind == "local" and derived_dp(tiny) == 1


@pytest.mark.parametrize("model,layers,hidden,ffn,heads,kv", [
    ("llama3.1_8b", 32, 4096, 14336, 32, 8), ("llama3.3_70b", 80, 8192, 28672, 64, 8),
    ("llama3.1_405b", 126, 16384, 53248, 128, 8)])
def test_real_architectures(model: str, layers: int, hidden: int, ffn: int, heads: int, kv: int) -> None:
    m = compose_root(f"model={model}").model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == \
        (layers, hidden, ffn, heads, kv)
    assert m.vocab_size == 128256 and m.rope_theta == 500000.0


def test_kv_heads_may_be_a_divisor_of_tp_like_megatron() -> None:
    root = compose_root("cluster.gpus_per_node=4", "parallelism.tp=4")  # 2 KV heads, replicated
    validate(root)
    bad = replace(root, model=replace(root.model, num_query_groups=3, num_attention_heads=12, hidden_size=96))
    with pytest.raises(ConfigError, match=r"model.num_query_groups=3 \(KV heads\) must be a multiple or divisor") as err:
        validate(bad)
    assert len(err.value.problems) == 1


def test_run_dir_is_atomic(tmp_path: Path) -> None:
    path = new_run_dir_path(str(tmp_path), "a'; rm -rf /")
    assert path.name.startswith("a-rm-") and path.parent == tmp_path

    with pytest.raises(TypeError):
        create_run_dir(path, {"config.yaml": "x", "bad": None})  # type: ignore[dict-item]
    assert not path.exists() and list(tmp_path.iterdir()) == []
    create_run_dir(path, {"config.yaml": "x"})
    assert (path / "logs").is_dir() and (path / "config.yaml").read_text() == "x"
    assert new_run_dir_path(str(tmp_path), "a'; rm -rf /") != path
