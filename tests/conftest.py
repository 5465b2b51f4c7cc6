"""Shared test setup: quiet TensorFlow, importable helpers, seeded and cleared Keras."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_keras():
    """Seed Python, NumPy and the backend before each test; drop Keras state after it."""
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()
