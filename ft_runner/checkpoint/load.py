"""Load this rank's shard of an FT checkpoint directory into a GPTStage.

Every tensor of the layout table that the config says the model has is read and copied into the
parameter the table names; stages skip the tensors another pipeline stage holds. Reads directories
written by our converter and by FT's own (which may lack `tensor_para_size`: the checkpoint's TP
is then taken from the `<N>-gpu` directory name). A checkpoint split for another TP is joined and
re-split.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ft_runner.checkpoint import layout
from ft_runner.config import ConfigError, ModelConfig, read_section
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
    if match and "tensor_para_size" not in read_section(ckpt_dir / "config.ini")[1]:
        ckpt_tp = int(match.group(1))
    return config, ckpt_tp


def check_grid(config: ModelConfig, tp: int, pp: int) -> None:
    config.check_tp(tp)
    if config.num_layer % pp:
        raise ConfigError(f"--pp {pp} does not divide the model's {config.num_layer} layers")


def load_stage(ckpt_dir: Path, grid, group, dtype: str, device: torch.device) -> GPTStage:
    """Build this rank's stage and fill it with its slice of every tensor it holds."""
    config, ckpt_tp = read_config(ckpt_dir)
    check_grid(config, grid.tp, grid.pp)
    stage = GPTStage(config, grid, group)
    reader = _ShardReader(Path(ckpt_dir), config, ckpt_tp, grid.tp, grid.tp_rank)
    for spec in layout.global_specs(config):
        _load(stage, spec, None, reader)
    for local, block in enumerate(stage.layers):
        for spec in layout.layer_specs(config):
            _load(block, spec, stage.first_layer + local, reader)
    return stage.to(device=device, dtype=TORCH_DTYPES[dtype]).eval()


def _load(module: torch.nn.Module, spec: layout.TensorSpec, layer: int | None, reader: _ShardReader) -> None:
    param = _find(module, spec.param)
    if param is None:  # held by another pipeline stage
        return
    if spec.vocab:
        value = reader.vocab_rows(spec)
    elif spec.split is not None:
        value = reader.shard(spec, layer)
    else:
        value = reader.whole(spec, layer)
    if spec.kernel:  # [in, ...out] -> torch's [out, in]
        value = value.reshape(value.shape[0], -1).T
    param.copy_(torch.from_numpy(np.ascontiguousarray(value)).reshape(param.shape))


def _find(module: torch.nn.Module, path: str) -> torch.Tensor | None:
    """`module.a.b.weight`, or None where a module on the way is absent on this stage."""
    *owners, leaf = path.split(".")
    for name in owners:
        module = getattr(module, name, None)
        if module is None:
            return None
    param = getattr(module, leaf)
    if param is None:  # the layout table and the model disagree on which tensors exist
        raise RuntimeError(f"the model has no parameter {path} for a tensor the config says exists")
    return param


class _ShardReader:
    """Reads tensors of the layout table and cuts out this rank's slice."""

    def __init__(self, directory: Path, config: ModelConfig, ckpt_tp: int, tp: int, tp_rank: int):
        self.directory, self.config, self.ckpt_tp = directory, config, ckpt_tp
        self.tp, self.tp_rank = tp, tp_rank

    def whole(self, spec: layout.TensorSpec, layer: int | None) -> np.ndarray:
        return layout.read_tensor(self.directory, spec, layer, self.config, self.ckpt_tp)

    def shard(self, spec: layout.TensorSpec, layer: int | None) -> np.ndarray:
        if self.ckpt_tp == self.tp:  # read only this rank's file
            return layout.read_piece(self.directory, spec, layer, self.config, self.tp, self.tp_rank)
        return spec.split.split(self.whole(spec, layer), self.tp, self.config)[self.tp_rank]

    def vocab_rows(self, spec: layout.TensorSpec) -> np.ndarray:
        """Rows of an embedding (or LM-head bias), the vocabulary padded with zeros to a multiple of TP."""
        if spec.fallback and not layout.exists(self.directory, spec, None, self.ckpt_tp):
            spec = next(s for s in layout.GLOBAL_TENSORS if s.name == spec.fallback)
        table = self.whole(spec, None)
        padded = padded_vocab(table.shape[0], self.tp)
        table = np.concatenate([table, np.zeros((padded - table.shape[0], *table.shape[1:]), table.dtype)])
        return np.split(table, self.tp)[self.tp_rank]
