"""Fixtures shared by the training tests (``tests/training_fixtures.py`` has the helpers they use)."""
import pytest

from tests.training_fixtures import prepare_base, reset_accelerate


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny corpus and backbones of the training tests (made once per session, see ``prepare_base``)."""
    return prepare_base(tmp_path_factory.getbasetemp() / "training")


@pytest.fixture
def fresh_accelerate():
    """A fresh accelerate state before and after the test (``pytestmark = pytest.mark.usefixtures(...)``)."""
    reset_accelerate()
    yield
    reset_accelerate()
