"""Shared test set-up."""

import os

import pytest


@pytest.fixture(autouse=True)
def restored_environment():
    """Give each test the process environment as it found it: building `TrainingArguments` with
    `fsdp` sets variables (FSDP_CPU_RAM_EFFICIENT_LOADING, ...) that would otherwise reach the
    training processes that later tests launch."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
