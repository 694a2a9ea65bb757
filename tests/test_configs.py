"""The example worker configs in configs/ stay loadable as the settings evolve."""
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


def test_workers_spin_openmp_briefly_unless_told_how_to_wait(monkeypatch):
    from corolla.cli import OPENMP_SPIN, spin_briefly
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    spin_briefly()
    assert os.environ["GOMP_SPINCOUNT"] == OPENMP_SPIN
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    spin_briefly()
    assert "GOMP_SPINCOUNT" not in os.environ
