import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import onnx  # noqa: E402
import pytest  # noqa: E402
from models import residual_cnn  # noqa: E402


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The residual test CNN (tests/models.py) saved as an ONNX file."""
    path = tmp_path_factory.mktemp("model") / "cnn.onnx"
    onnx.save(residual_cnn(), str(path))
    return str(path)
