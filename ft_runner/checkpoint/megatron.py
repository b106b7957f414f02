"""Megatron-LM GPT checkpoints in FT's layout, as FT's megatron_ckpt_convert.py did (ft_format.md §2.2).

A checkpoint directory holds `mp_rank_XX/model_optim_rng.pt` (or `mp_rank_XX_YYY/` when trained
with pipeline parallelism), possibly under `iter_NNNNNNN/` named by `latest_checkpointed_iteration.txt`.
The shards of the training TP are merged into whole tensors here; the converter then splits them
for the serving TP, so any training TP serves under any serving TP. The tokenizer comes from the
GPT-2 BPE files next to the shards (`vocab.json` / `gpt2-vocab.json`, `merges.txt` / `gpt2-merges.txt`).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

import numpy as np

from ft_runner.config import ConfigError, ModelConfig

_SHARD = re.compile(r"(?:mp_rank_(\d+)(?:_(\d+))?|tp_rank_(\d+)_pp_rank_(\d+))$")
VOCAB_FILES = ("vocab.json", "gpt2-vocab.json")
MERGES_FILES = ("merges.txt", "gpt2-merges.txt")

# Megatron name (after `language_model.`, per layer after `encoder.layers.N.`) -> (FT name, how TP shards join)
#   rows: concatenate along axis 0 (vocab- and column-parallel); cols: along axis 1 (row-parallel);
#   qkv: per-head interleaved column-parallel; first: replicated, take rank 0's.
GLOBAL_NAMES = {
    "embedding.word_embeddings.weight": ("wte", "rows"),
    "embedding.position_embeddings.weight": ("wpe", "first"),
    "encoder.final_layernorm.weight": ("final_layernorm.weight", "first"),
    "encoder.final_layernorm.bias": ("final_layernorm.bias", "first"),
    "output_layer.weight": ("lm_head.weight", "rows"),  # only with untied embeddings
}
LAYER_NAMES = {
    "input_layernorm.weight": ("input_layernorm.weight", "first"),
    "input_layernorm.bias": ("input_layernorm.bias", "first"),
    "self_attention.query_key_value.weight": ("attention.query_key_value.weight", "qkv"),
    "self_attention.query_key_value.bias": ("attention.query_key_value.bias", "qkv"),
    "self_attention.dense.weight": ("attention.dense.weight", "cols"),
    "self_attention.dense.bias": ("attention.dense.bias", "first"),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", "first"),
    "post_attention_layernorm.bias": ("post_attention_layernorm.bias", "first"),
    "mlp.dense_h_to_4h.weight": ("mlp.dense_h_to_4h.weight", "rows"),
    "mlp.dense_h_to_4h.bias": ("mlp.dense_h_to_4h.bias", "rows"),
    "mlp.dense_4h_to_h.weight": ("mlp.dense_4h_to_h.weight", "cols"),
    "mlp.dense_4h_to_h.bias": ("mlp.dense_4h_to_h.bias", "first"),
}


def _root(path: Path) -> Path:
    """The directory holding the shard directories (following latest_checkpointed_iteration.txt)."""
    marker = path / "latest_checkpointed_iteration.txt"
    if marker.exists():
        iteration = marker.read_text().strip()
        return path / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    return path


def shard_files(path: Path) -> dict[tuple[int, int], Path]:
    """{(tp_rank, pp_rank): the shard's .pt file}; empty when `path` is no Megatron checkpoint."""
    root = _root(Path(path))
    if not root.is_dir():
        return {}
    shards = {}
    for sub in sorted(root.iterdir()):
        match = _SHARD.match(sub.name)
        if not match or not sub.is_dir():
            continue
        tp, pp = (match.group(1), match.group(2)) if match.group(1) is not None else (match.group(3), match.group(4))
        files = [sub / "model_optim_rng.pt"] if (sub / "model_optim_rng.pt").exists() else sorted(sub.glob("*.pt"))
        if files:
            shards[int(tp), int(pp or 0)] = files[0]
    return shards


def is_checkpoint(path: Path) -> bool:
    return Path(path).is_dir() and bool(shard_files(path))


def load_shard(path: Path) -> dict:
    """torch.load with weights_only=True; the training args (an argparse.Namespace) are allowed."""
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{path}: refused by torch.load(weights_only=True): {str(exc).splitlines()[0]}") from None


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif value is not None:
            out[prefix + key] = value
    return out


def _normalise(name: str) -> str:
    """Older Megatron spellings -> the current ones; drop the `language_model.` prefix."""
    name = name.removeprefix("language_model.")
    name = re.sub(r"^transformer\.", "encoder.", name)
    return re.sub(r"\.attention\.", ".self_attention.", name)


def _qkv_shard(array: np.ndarray, version: float, heads_local: int) -> np.ndarray:
    """One rank's fused QKV rows -> (3, heads_local, head_dim, ...) for checkpoint versions 0, 1 and 2+."""
    rest = array.shape[1:]
    if version >= 2:  # [heads, 3, head_dim]
        return array.reshape(heads_local, 3, -1, *rest).swapaxes(0, 1)
    if version == 1:  # [heads, head_dim, 3]
        return np.moveaxis(array.reshape(heads_local, -1, 3, *rest), 2, 0)
    return array.reshape(3, heads_local, -1, *rest)  # [3, heads, head_dim]


def _join(pieces: list[np.ndarray], how: str, version: float, heads: int) -> np.ndarray:
    if how == "first":
        return pieces[0]
    if how == "rows":
        return np.concatenate(pieces, axis=0)
    if how == "cols":
        return np.concatenate(pieces, axis=1)
    qkv = np.concatenate([_qkv_shard(p, version, heads // len(pieces)) for p in pieces], axis=1)
    qkv = qkv.reshape(3 * heads, -1, *qkv.shape[3:])  # (3 * heads, head_dim[, in])
    return np.moveaxis(qkv, -1, 0) if qkv.ndim == 3 else qkv  # weight -> (in, 3 * heads, head_dim)


class MegatronCheckpoint:
    """The merged tensors (FT names, FT orientation) and the config of one Megatron GPT checkpoint."""

    def __init__(self, path: Path, weight_data_type: str = "fp32"):
        self.path = Path(path)
        shards = shard_files(self.path)
        tps = sorted({tp for tp, _ in shards})
        pps = sorted({pp for _, pp in shards})
        if set(shards) != {(t, p) for t in tps for p in pps}:
            raise ConfigError(f"{self.path}: incomplete Megatron checkpoint, shards {sorted(shards)}")
        loaded = {key: load_shard(f) for key, f in shards.items()}
        first = loaded[0, 0]
        args = first.get("args")
        if args is None:
            raise ConfigError(f"{shards[0, 0]} has no training 'args': cannot tell the model's shape")
        self.vocab_file, self.merges_file = _bpe_files(self.path)
        self.config = self._config(args, weight_data_type)
        self.tensors = self._merge(loaded, len(tps), len(pps), float(first.get("checkpoint_version", 0)))

    def _config(self, args, weight_data_type: str) -> ModelConfig:
        if getattr(args, "apply_residual_connection_post_layernorm", False):
            raise ConfigError("Megatron apply_residual_connection_post_layernorm=True is not supported")
        vocab = json.loads(self.vocab_file.read_text(encoding="utf-8"))
        end = vocab.get("<|endoftext|>", 50256)
        tanh_gelu = getattr(args, "openai_gelu", False) or getattr(args, "bias_gelu_fusion", True)
        return ModelConfig(
            model_name="gpt", head_num=args.num_attention_heads,
            size_per_head=args.hidden_size // args.num_attention_heads,
            inter_size=getattr(args, "ffn_hidden_size", None) or 4 * args.hidden_size,
            num_layer=args.num_layers, max_pos_seq_len=args.max_position_embeddings,
            # FT kept the padded vocabulary; the padding rows are never real tokens, so drop them
            vocab_size=min(args.padded_vocab_size, len(vocab)), start_id=end, end_id=end,
            weight_data_type=weight_data_type, layernorm_eps=getattr(args, "layernorm_epsilon", 1e-5),
            activation_type="Gelu" if tanh_gelu else "GeluExact",
        )

    def _merge(self, loaded: dict, tp: int, pp: int, version: float) -> dict[str, np.ndarray]:
        per_stage = self.config.num_layer // pp
        tensors = {}
        for stage in range(pp):
            states = [{_normalise(k): v for k, v in _flatten(loaded[r, stage]["model"]).items()} for r in range(tp)]
            for name in states[0]:
                target = self._target(name, stage * per_stage)
                if target is None:
                    continue
                ft_name, how = target
                pieces = [s[name].float().numpy() for s in states]
                tensors[ft_name] = _join(pieces, how, version, self.config.head_num)
        for name, array in tensors.items():  # Megatron Linear weights are [out, in]; FT stores [in, out]
            if array.ndim == 2 and re.search(r"(dense|dense_h_to_4h|dense_4h_to_h)\.weight$", name):
                tensors[name] = array.T
        for name in ("wte", "lm_head.weight"):
            if name in tensors:
                tensors[name] = tensors[name][: self.config.vocab_size]
        return tensors

    @staticmethod
    def _target(name: str, first_layer: int) -> tuple[str, str] | None:
        if name in GLOBAL_NAMES:
            return GLOBAL_NAMES[name]
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
        if match and match.group(2) in LAYER_NAMES:
            ft_name, how = LAYER_NAMES[match.group(2)]
            return f"layers.{first_layer + int(match.group(1))}.{ft_name}", how
        return None

    def save_tokenizer(self, directory: Path) -> None:
        """GPT-2's byte-level BPE from the two files, saved as a HF tokenizer (and the files copied, as FT did)."""
        import shutil

        import transformers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        bpe = Tokenizer(models.BPE.from_file(str(self.vocab_file), str(self.merges_file)))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        eos = "<|endoftext|>"
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos,
                                                         unk_token=eos, pad_token=eos)
        tokenizer.save_pretrained(directory)
        shutil.copy(self.vocab_file, Path(directory) / "vocab.json")
        shutil.copy(self.merges_file, Path(directory) / "merges.txt")


def _bpe_files(path: Path) -> tuple[Path, Path]:
    for where in (path, path.parent):
        vocab = next((where / f for f in VOCAB_FILES if (where / f).exists()), None)
        merges = next((where / f for f in MERGES_FILES if (where / f).exists()), None)
        if vocab and merges:
            return vocab, merges
    raise ConfigError(f"{path}: a Megatron checkpoint needs the GPT-2 BPE files next to it "
                      f"({' or '.join(VOCAB_FILES)} and {' or '.join(MERGES_FILES)})")
