"""Shared fixtures.

The tests run tiny models on a shared 2-core machine, where PyTorch's intra-op threads
only spin against each other and other processes (some steps ran 10-100x slower): the
fixtures below hold torch to one thread and restore the previous count afterwards. Test
modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``, or
a test asks for ``one_thread`` by name.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread() -> Iterator[None]:
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_thread_per_module() -> Iterator[None]:
    yield from _single_thread()


@pytest.fixture(scope="session")
def cuda_lib_dir(tmp_path_factory: pytest.TempPathFactory):
    """One build folder for the CUDA C++ libraries for the whole test session: each library
    compiles once (~10-30 s with nvcc on 2 cores) however many tests load it."""
    return tmp_path_factory.mktemp("cuda-libs")
