"""Load this rank's shard of an FT checkpoint directory into a GPTStage.

Reads directories written by our converter and by FT's own (fp32, no `tensor_para_size`: the
checkpoint's TP is then taken from the `<N>-gpu` directory name). A checkpoint split for another
TP is joined and re-split.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ft_runner.checkpoint import layout
from ft_runner.config import ConfigError, ModelConfig
from ft_runner.model.decoder import GPTStage, padded_vocab

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_config(ckpt_dir: Path) -> tuple[ModelConfig, int]:
    """The model config and the TP the checkpoint was split for."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.ini").exists():
        raise ConfigError(f"{ckpt_dir} is not an FT checkpoint directory (no config.ini)")
    config = ModelConfig.from_ini(ckpt_dir / "config.ini")
    ckpt_tp = config.tensor_para_size
    match = re.fullmatch(r"(\d+)-gpu", ckpt_dir.name)
    if match and not _has_key(ckpt_dir, "tensor_para_size"):
        ckpt_tp = int(match.group(1))
    return config, ckpt_tp


def _has_key(ckpt_dir: Path, key: str) -> bool:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ckpt_dir / "config.ini")
    return parser.has_option("gpt", key)


def check_grid(config: ModelConfig, tp: int, pp: int) -> None:
    if config.head_num % tp:
        raise ConfigError(f"--tp {tp} does not divide the model's {config.head_num} attention heads")
    if config.inter_size % tp:
        raise ConfigError(f"--tp {tp} does not divide the model's FFN size {config.inter_size}")
    if config.num_layer % pp:
        raise ConfigError(f"--pp {pp} does not divide the model's {config.num_layer} layers")


def load_stage(ckpt_dir: Path, grid, group, dtype: str, device: torch.device) -> GPTStage:
    """Build this rank's stage and fill it with its slice of every tensor it holds."""
    config, ckpt_tp = read_config(ckpt_dir)
    check_grid(config, grid.tp, grid.pp)
    stage = GPTStage(config, grid, group)
    reader = _ShardReader(Path(ckpt_dir), config, ckpt_tp, grid.tp, grid.tp_rank)
    if stage.wte is not None:
        stage.wte.weight.copy_(reader.vocab_rows("wte"))
        if stage.wpe is not None:
            stage.wpe.weight.copy_(_t(reader.whole("wpe")))
    if stage.lm_head is not None:
        head = "lm_head.weight" if reader.exists("lm_head.weight") else "wte"
        stage.lm_head.weight.copy_(reader.vocab_rows(head))
        stage.ln_f.weight.copy_(_t(reader.whole("final_layernorm.weight")))
        stage.ln_f.bias.copy_(_t(reader.whole("final_layernorm.bias")))
    for local, block in enumerate(stage.layers):
        _load_block(block, reader, stage.first_layer + local, config.hidden_size)
    return stage.to(device=device, dtype=TORCH_DTYPES[dtype]).eval()


def _load_block(block, reader, i: int, hidden: int) -> None:
    p = f"layers.{i}."
    block.ln1.weight.copy_(_t(reader.whole(p + "input_layernorm.weight")))
    block.ln1.bias.copy_(_t(reader.whole(p + "input_layernorm.bias")))
    block.ln2.weight.copy_(_t(reader.whole(p + "post_attention_layernorm.weight")))
    block.ln2.bias.copy_(_t(reader.whole(p + "post_attention_layernorm.bias")))
    qkv = reader.shard(p + "attention.query_key_value.weight")  # (H, 3, H/T): [in, out]
    block.attn.qkv.weight.copy_(_t(qkv.reshape(hidden, -1).T))
    block.attn.qkv.bias.copy_(_t(reader.shard(p + "attention.query_key_value.bias").reshape(-1)))
    block.attn.dense.weight.copy_(_t(reader.shard(p + "attention.dense.weight").T))
    block.attn.dense.bias.copy_(_t(reader.whole(p + "attention.dense.bias")))
    block.mlp.fc1.weight.copy_(_t(reader.shard(p + "mlp.dense_h_to_4h.weight").T))
    block.mlp.fc1.bias.copy_(_t(reader.shard(p + "mlp.dense_h_to_4h.bias")))
    block.mlp.fc2.weight.copy_(_t(reader.shard(p + "mlp.dense_4h_to_h.weight").T))
    block.mlp.fc2.bias.copy_(_t(reader.whole(p + "mlp.dense_4h_to_h.bias")))


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


class _ShardReader:
    """Reads tensors by FT name and cuts out this rank's slice along the layout's split axis."""

    def __init__(self, directory: Path, config: ModelConfig, ckpt_tp: int, tp: int, tp_rank: int):
        self.directory, self.config, self.ckpt_tp = directory, config, ckpt_tp
        self.tp, self.tp_rank = tp, tp_rank
        self.specs = {}
        for spec, layer in layout.all_specs(config):
            name = spec.name.format(i=layer) if layer is not None else spec.name
            self.specs[name] = (spec, layer)

    def exists(self, name: str) -> bool:
        spec, layer = self.specs[name]
        return (self.directory / spec.file_names(self.ckpt_tp, layer)[0]).exists()

    def whole(self, name: str) -> np.ndarray:
        spec, layer = self.specs[name]
        return layout.read_tensor(self.directory, spec, layer, self.config, self.ckpt_tp)

    def shard(self, name: str) -> np.ndarray:
        spec, layer = self.specs[name]
        if self.ckpt_tp == self.tp:  # read only this rank's file
            path = self.directory / spec.file_names(self.tp, layer)[self.tp_rank]
            shape = list(spec.shape(self.config))
            shape[spec.split_axis] //= self.tp
            return layout.read_file(path, tuple(shape), self.config.weight_data_type)
        return np.split(self.whole(name), self.tp, axis=spec.split_axis)[self.tp_rank]

    def vocab_rows(self, name: str) -> torch.Tensor:
        """Rows of an embedding, the vocabulary padded with zero rows to a multiple of TP."""
        table = self.whole(name)
        padded = padded_vocab(table.shape[0], self.tp)
        table = np.concatenate([table, np.zeros((padded - table.shape[0], table.shape[1]), table.dtype)])
        return _t(np.split(table, self.tp)[self.tp_rank])
