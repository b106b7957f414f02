"""Where a model comes from: the embedded default, a local HF directory, or a hub id."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

from ft_runner.config import ConfigError

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "tiny-gpt2"
DEFAULT_MODEL_NAME = "tiny-gpt2"

# What a snapshot needs; weights as safetensors where the repo has them.
_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "merges*", "vocab*"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    name: str  # as the user gave it (hub id or directory)
    path: Path  # a local HF directory

    @property
    def key(self) -> str:
        """The served model name and the output sub-directory, as FT's example derived it."""
        return re.sub(r"\W", "_", self.name)


def resolve_model(name: Optional[str], revision: Optional[str] = None) -> ModelSource:
    """Return a local directory for `name`; None means the embedded tiny GPT-2."""
    if name is None:
        return ModelSource(DEFAULT_MODEL_NAME, DEFAULT_MODEL_DIR)
    local = Path(name).expanduser()
    if local.is_dir():
        from ft_runner.checkpoint.megatron import is_checkpoint

        if not (local / "config.json").exists() and not is_checkpoint(local):
            raise ConfigError(f"{local} is a directory without a HuggingFace config.json "
                              f"(nor a Megatron-LM checkpoint with mp_rank_XX/ shards)")
        return ModelSource(local.resolve().name, local.resolve())
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ConfigError(f"model directory {name} does not exist")
    return ModelSource(name, _download(name, revision))


def _download(repo_id: str, revision: Optional[str]) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        patterns = list(_ALLOW) if any(f.endswith(".safetensors") for f in files) else _ALLOW + ["*.bin"]
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError as exc:
        raise ConfigError(f"no model {repo_id!r} on the hub (or it is gated: set HF_TOKEN)") from exc
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError):
        pass  # offline or unreachable: fall back to the local cache
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as exc:
        raise ConfigError(
            f"cannot download {repo_id!r} and it is not in the local cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE})"
        ) from exc
