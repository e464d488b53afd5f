"""The suite's torch thread count (SIMENV_TEST_THREADS, default 1) for the ranking tests, restored after."""

from __future__ import annotations

import pytest
import torch

from tests.numerics import TEST_THREADS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)
