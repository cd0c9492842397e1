"""Shared test set-up."""

import os

import pytest
import torch

# TRL's trainers report usage to the Hub when they are built; no test sends anything.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def restored_environment():
    """Give each test the process environment as it found it: building `TrainingArguments` with
    `fsdp` sets variables (FSDP_CPU_RAM_EFFICIENT_LOADING, ...) that would otherwise reach the
    training processes that later tests launch."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): one
    intra-op thread is as fast, and much faster on a busy 2-core machine, where the threads' waiting
    made such a module five times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
