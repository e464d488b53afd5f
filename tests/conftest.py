"""Suite-wide settings: torch and faiss run with ``SIMENV_TEST_THREADS`` threads (default 1).

One thread keeps timings steady on a shared machine and is what ``make test`` uses; ``.ci/run``
runs the numerics tests again with 2 threads (and ``OMP_NUM_THREADS=2``), so that a float
assertion which silently depends on the order of summation fails here, not on a user's
machine. Modules that pin their own thread count use :data:`tests.numerics.TEST_THREADS`.
"""

from __future__ import annotations

import faiss
import pytest
import torch

from tests.numerics import TEST_THREADS


def pytest_report_header(config):
    return f"torch/faiss threads: {TEST_THREADS} (SIMENV_TEST_THREADS)"


@pytest.fixture(autouse=True, scope="session")
def _suite_threads():
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(TEST_THREADS)
    faiss.omp_set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])
