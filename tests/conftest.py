import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_tiny_gpt2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 (4 layers, 4 heads, vocab 1027) with the embedded tokenizer."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-random-gpt2")
