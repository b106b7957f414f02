import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_tiny_gpt2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 (4 layers, 4 heads, vocab 1027) with the embedded tokenizer."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-random-gpt2")


@pytest.fixture(scope="session")
def surface_server(tiny_gpt2, tmp_path_factory):
    """One TP=2 server (`mpirun -n 2`) on tiny_gpt2, shared by the request-surface tests: its text
    model `tiny_random_gpt2`, streaming model `tiny_random_gpt2_stream` and token model `fastertransformer`."""
    from helpers import Server

    with Server(2, "--tp", "2", "--hf-model-name", str(tiny_gpt2), tmp=tmp_path_factory.mktemp("surface")) as server:
        yield server
