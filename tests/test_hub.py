"""Model sources: the embedded default, local directories, and hub ids served from the HF cache offline."""

import shutil

import pytest

from ft_runner.config import ConfigError
from ft_runner.hub import DEFAULT_MODEL_DIR, resolve_model


def test_no_name_means_the_embedded_model():
    source = resolve_model(None)
    assert source.path == DEFAULT_MODEL_DIR and source.key == "tiny_gpt2"
    assert (source.path / "model.safetensors").exists() and (source.path / "tokenizer.json").exists()


def test_a_local_directory_is_used_in_place(tiny_gpt2):
    source = resolve_model(str(tiny_gpt2))
    assert source.path == tiny_gpt2.resolve() and source.key == "tiny_random_gpt2"


def test_missing_directory_and_directory_without_config_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="without a HuggingFace config.json"):
        resolve_model(str(tmp_path))


def test_a_hub_id_is_served_from_the_cache_when_offline(tiny_gpt2, tmp_path, monkeypatch):
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    import huggingface_hub.constants as hub_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-gpt2"
    shutil.copytree(tiny_gpt2, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    source = resolve_model("acme/tiny-gpt2")
    assert source.key == "acme_tiny_gpt2"
    assert (source.path / "config.json").exists() and commit in str(source.path)
    with pytest.raises(ConfigError, match="not in the local cache"):
        resolve_model("acme/other-model")
