"""End-to-end tests: whole models imported from ONNX and run by the reference interpreter, compared
with onnxruntime. Pytest runs with `--import-mode=importlib`, so this folder is put on `sys.path`
here for the test modules to import the model builders and the harness."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def data_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "data"
