import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every diffusion test on one thread (see the root conftest's ``one_thread``)."""
