"""The example worker configs in configs/ stay loadable as the settings evolve."""
from __future__ import annotations

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
