"""Tier 1: the test-cluster helper's config and its skip/fail rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import slurm_cluster


def test_slurm_conf_names_this_host_and_its_resources():
    conf = slurm_cluster.render_slurm_conf(Path("/w"), hostname="ip-10-1-2-3", cpus=16, real_memory_mib=62000,
                                           ctld_port=40001, slurmd_port=40002, munge_socket=Path("/tmp/m/s"))
    lines = conf.splitlines()
    assert "SlurmctldHost=ip-10-1-2-3(127.0.0.1)" in lines
    assert "NodeName=ip-10-1-2-3 NodeAddr=127.0.0.1 CPUs=16 RealMemory=62000 State=UNKNOWN" in lines
    assert "SlurmctldPort=40001" in lines and "SlurmdPort=40002" in lines
    assert "AuthInfo=socket=/tmp/m/s" in lines
    for required in ("DefMemPerCPU=500", "JobCompType=jobcomp/filetxt", "JobCompLoc=/w/log/jobcomp.txt",
                     "MinJobAge=300", "AccountingStorageType=accounting_storage/none", "EnforcePartLimits=ALL"):
        assert required in lines
    assert any(line.startswith("PartitionName=debug ") and "Default=YES" in line for line in lines)
    assert any(line.startswith("PartitionName=short ") and "MaxTime=00:10:00" in line for line in lines)


def test_require_slurm_skips_without_ci(monkeypatch):
    monkeypatch.setattr(slurm_cluster, "missing_binaries", lambda: ["slurmctld"])
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install"):
        slurm_cluster.require_slurm()


def test_require_slurm_fails_in_ci(monkeypatch):
    monkeypatch.setattr(slurm_cluster, "missing_binaries", lambda: ["slurmctld", "munged"])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set but .*slurmctld, munged"):
        slurm_cluster.require_slurm()


def test_require_slurm_passes_when_installed(monkeypatch):
    monkeypatch.setattr(slurm_cluster, "missing_binaries", lambda: [])
    monkeypatch.setenv("CI", "true")
    slurm_cluster.require_slurm()


def test_start_slurm_without_binaries_raises_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm_cluster, "missing_binaries", lambda: ["slurmd"])
    with pytest.raises(slurm_cluster.SlurmNotInstalled, match="missing: slurmd.*apt-get install"):
        slurm_cluster.start_slurm(tmp_path)
