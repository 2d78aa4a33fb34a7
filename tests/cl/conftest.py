"""Shared fixtures for the continual-learning tests: one tiny Llama checkpoint and a random PEFT adapter."""

from __future__ import annotations

import pytest
import torch
from lorafleet.worker.testing import TinyLlamaSpec, build_peft_adapter, build_tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("cl-tiny"), TinyLlamaSpec(), seed=0)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, tiny_dir):
    return build_peft_adapter(tmp_path_factory.mktemp("cl-adapter") / "ad", tiny_dir, rank=4, alpha=8, seed=3, std=0.1)


@pytest.fixture()
def tiny_model(tiny_dir):
    from lorafleet.worker.loader import load_model

    model, _ = load_model(tiny_dir, torch.device("cpu"), torch.float32)
    return model
