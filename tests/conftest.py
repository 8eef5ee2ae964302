"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors and tiny models: one thread skips OpenMP hand-offs, which cost up to 100x when other
    processes share the 2-core machine. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`;
    module scope, so module-scoped fixtures (a model trained once per module) run single-threaded too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
