import pyro
import pytest

from pvae.utils import torch_threads


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    """Every test starts from an empty param store, with Pyro validation on and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def one_thread():
    """One intra-op thread, for tests of thousands of tiny steps where threads cost more than they save.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with torch_threads(1):
        yield
