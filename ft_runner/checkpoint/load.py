"""Load this rank's shard of an FT checkpoint directory into a GPTStage.

Every tensor of the layout table that the config says the model has is read and copied into the
parameter the table names; stages skip the tensors another pipeline stage holds. Reads directories
written by our converter and by FT's own (which may lack `tensor_para_size`: the checkpoint's TP
is then taken from the `<N>-gpu` directory name). A checkpoint split for another TP is joined and
re-split.

Quantized serving (config.QuantConfig): the layers' projections are quantized here, once, from a
float checkpoint (as FT's op did at load) or read from an int8 one (weights and scales, as the
converter wrote them). A channel's scale covers all of its inputs: a row-parallel shard's scales
come from the whole tensor, so every TP serves the same model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ft_runner.checkpoint import layout
from ft_runner.config import ConfigError, ModelConfig, QuantConfig, read_section
from ft_runner.model import quant as q
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


def load_stage(ckpt_dir: Path, grid, group, dtype: str, device: torch.device,
               quant: QuantConfig | None = None) -> GPTStage:
    """Build this rank's stage and fill it with its slice of every tensor it holds; `quant` (default:
    none) quantizes the layers' projections. The stage keeps `quant` (the engines read its KV-cache dtype)."""
    quant = quant or QuantConfig()
    config, ckpt_tp = read_config(ckpt_dir)
    check_grid(config, grid.tp, grid.pp)
    quant.check_device(device)
    kind = _weight_quantization(config, quant, Path(ckpt_dir))
    stage = GPTStage(config, grid, group)
    reader = _ShardReader(Path(ckpt_dir), config, ckpt_tp, grid.tp, grid.tp_rank)
    for spec in layout.global_specs(config):
        _load(stage, spec, None, reader)
    for local, block in enumerate(stage.layers):
        for spec in layout.layer_specs(config):
            if spec.kernel and kind is not None:
                _owner(block, spec.param).set_quantized(reader.quantized(spec, stage.first_layer + local, kind))
            else:
                _load(block, spec, stage.first_layer + local, reader)
    place(stage, device, TORCH_DTYPES[dtype])
    stage.quant = quant
    return stage.eval()


def _weight_quantization(config: ModelConfig, quant: QuantConfig, ckpt_dir: Path) -> str | None:
    """The layers' weight quantization, None for none; an int8 checkpoint serves only as int8_wo."""
    kind = None if quant.quantization == "none" else quant.quantization
    if config.weight_data_type == "int8" and kind != "int8_wo":
        raise ConfigError(f"{ckpt_dir} holds int8 weights (weight_data_type = int8): serve it with "
                          f"--quantization int8_wo, not {quant.quantization}, or convert a float checkpoint")
    return kind


def place(stage: GPTStage, device: torch.device, dtype: torch.dtype) -> None:
    """Move the stage to `device`, its float tensors in `dtype`; quantized weights and their fp32
    scales keep their dtypes (Module.to(dtype) would cast e4m3 weights and the scales too)."""
    stage.to(device=device)
    keep = {id(m.weight_scale) for _, m in q.quantized_linears(stage) if m.quant is not None}
    for param in stage.parameters():
        if param.is_floating_point() and param.dtype != q.FP8 and id(param) not in keep:
            param.data = param.data.to(dtype)


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
        value = _linear_weight(value)
    param.copy_(torch.from_numpy(np.ascontiguousarray(value)).reshape(param.shape))


def _linear_weight(kernel: np.ndarray) -> np.ndarray:
    """A kernel in FT's layout [in, ...out] as torch's Linear weight [out, in]."""
    return kernel.reshape(kernel.shape[0], -1).T


def _owner(module: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module holding the parameter at `path` (`attn.qkv.weight` -> attn.qkv)."""
    for name in path.split(".")[:-1]:
        module = getattr(module, name)
    return module


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
        if spec.split is None:
            return self.whole(spec, layer)
        if self.ckpt_tp == self.tp:  # read only this rank's file
            return layout.read_piece(self.directory, spec, layer, self.config, self.tp, self.tp_rank)
        return spec.split.split(self.whole(spec, layer), self.tp, self.config)[self.tp_rank]

    def quantized(self, spec: layout.TensorSpec, layer: int, kind: str) -> q.QuantizedWeight:
        """This rank's shard of a kernel, quantized (`kind`) per output channel over the whole
        channel: read from an int8 checkpoint, or quantized from a float one (a row-parallel shard
        takes its scales from the whole tensor)."""
        if self.config.weight_data_type == "int8":
            weight = torch.from_numpy(np.ascontiguousarray(_linear_weight(self.shard(spec, layer))))
            scale = torch.from_numpy(self.shard(layout.scale_spec(spec), layer).reshape(-1).copy())
            return q.QuantizedWeight(weight, scale, kind)
        scale = None
        if isinstance(spec.split, layout.Axis) and spec.split.axis == 0 and self.tp > 1:
            whole = self.whole(spec, layer)
            scale = q.channel_scale(torch.from_numpy(np.ascontiguousarray(_linear_weight(whole))), kind)
            piece = spec.split.split(whole, self.tp, self.config)[self.tp_rank]
        else:
            piece = self.shard(spec, layer)
        return q.quantize(torch.from_numpy(np.ascontiguousarray(_linear_weight(piece))), kind, scale)

    def vocab_rows(self, spec: layout.TensorSpec) -> np.ndarray:
        """Rows of an embedding (or LM-head bias), the vocabulary padded with zeros to a multiple of TP."""
        if spec.fallback and not layout.exists(self.directory, spec, None, self.ckpt_tp):
            spec = next(s for s in layout.GLOBAL_TENSORS if s.name == spec.fallback)
        table = self.whole(spec, None)
        padded = padded_vocab(table.shape[0], self.tp)
        table = np.concatenate([table, np.zeros((padded - table.shape[0], *table.shape[1:]), table.dtype)])
        return np.split(table, self.tp)[self.tp_rank]
