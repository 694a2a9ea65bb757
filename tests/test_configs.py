"""The example worker configs in configs/ stay loadable as the settings evolve; the settings local workers get."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from corolla.worker.config import WorkerConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads(path):
    config = WorkerConfig.load(path)
    assert config.model and (config.span() is not None or config.num_blocks)


def test_co_located_workers_wait_passively_only_where_their_threads_outnumber_the_cores(monkeypatch, tmp_path):
    from corolla.worker.launcher import openmp_env
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert openmp_env([["--threads", str(cores)]]) == {}  # one worker alone may spin
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_env([["--threads", "1"], ["--threads", "1"]]) == ({} if cores >= 2 else passive)
    assert openmp_env([["--threads", str(cores)], ["--blocks", "0:1", "--threads", "1"]]) == passive
    assert openmp_env([["--model", "m"], ["--model", "m"]]) == passive  # each takes every core
    one_thread = tmp_path / "worker.yaml"
    one_thread.write_text("model: m\nthreads: 1\n")
    assert openmp_env([["--config", str(one_thread)]] * 2) == ({} if cores >= 2 else passive)
    assert openmp_env([["--config", str(one_thread), "--threads", str(cores)]] * 2) == passive  # the flag wins
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert openmp_env([["--model", "m"], ["--model", "m"]]) == {}  # the user's choice stands
