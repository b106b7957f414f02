"""FasterTransformer's GPT checkpoint layout: one table for the converter and the loader.

Every file is the raw little-endian bytes of one array, no header. 2-D kernels are stored
[in, out]. A tensor with a split axis is cut into TP pieces saved as `<name>.<tp_rank>.bin`;
the others are saved once as `<name>.bin` (FT ft_format.md §2.1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ft_runner.config import ModelConfig

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str  # file name without `.bin`; `{i}` is the layer index
    shape: Callable[[ModelConfig], tuple]  # the whole (unsplit) tensor
    split_axis: Optional[int] = None  # None: one copy shared by every TP rank
    optional: bool = False

    def file_names(self, tp: int, layer: Optional[int] = None) -> list[str]:
        name = self.name.format(i=layer) if layer is not None else self.name
        if self.split_axis is None:
            return [f"model.{name}.bin"]
        return [f"model.{name}.{r}.bin" for r in range(tp)]


def _h(c):
    return c.hidden_size


GLOBAL_TENSORS = (
    TensorSpec("wte", lambda c: (c.vocab_size, _h(c))),
    TensorSpec("wpe", lambda c: (c.max_pos_seq_len, _h(c)), optional=True),
    TensorSpec("final_layernorm.weight", lambda c: (_h(c),)),
    TensorSpec("final_layernorm.bias", lambda c: (_h(c),)),
    TensorSpec("lm_head.weight", lambda c: (c.vocab_size, _h(c)), optional=True),  # absent: tied to wte
)

LAYER_TENSORS = (
    TensorSpec("layers.{i}.input_layernorm.weight", lambda c: (_h(c),)),
    TensorSpec("layers.{i}.input_layernorm.bias", lambda c: (_h(c),)),
    TensorSpec("layers.{i}.attention.query_key_value.weight", lambda c: (_h(c), 3, _h(c)), split_axis=-1),
    TensorSpec("layers.{i}.attention.query_key_value.bias", lambda c: (3, _h(c)), split_axis=-1),
    TensorSpec("layers.{i}.attention.dense.weight", lambda c: (_h(c), _h(c)), split_axis=0),
    TensorSpec("layers.{i}.attention.dense.bias", lambda c: (_h(c),)),
    TensorSpec("layers.{i}.post_attention_layernorm.weight", lambda c: (_h(c),)),
    TensorSpec("layers.{i}.post_attention_layernorm.bias", lambda c: (_h(c),)),
    TensorSpec("layers.{i}.mlp.dense_h_to_4h.weight", lambda c: (_h(c), c.inter_size), split_axis=-1),
    TensorSpec("layers.{i}.mlp.dense_h_to_4h.bias", lambda c: (c.inter_size,), split_axis=-1),
    TensorSpec("layers.{i}.mlp.dense_4h_to_h.weight", lambda c: (c.inter_size, _h(c)), split_axis=0),
    TensorSpec("layers.{i}.mlp.dense_4h_to_h.bias", lambda c: (_h(c),)),
)


def all_specs(config: ModelConfig):
    """Yield (spec, layer) for every tensor of the model; layer is None for global tensors."""
    for spec in GLOBAL_TENSORS:
        yield spec, None
    for layer in range(config.num_layer):
        for spec in LAYER_TENSORS:
            yield spec, layer


def write_tensor(directory: Path, spec: TensorSpec, layer, array: np.ndarray, tp: int, dtype: str) -> None:
    """Save one whole tensor, cut into TP pieces where the spec says so."""
    pieces = [array] if spec.split_axis is None else np.split(array, tp, axis=spec.split_axis)
    for file_name, piece in zip(spec.file_names(tp, layer), pieces):
        _to_file(np.ascontiguousarray(piece), directory / file_name, dtype)


def _to_file(array: np.ndarray, path: Path, dtype: str) -> None:
    if dtype == "bf16":  # numpy has no bfloat16: keep the upper half of each fp32
        bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        rounded.tofile(path)
    else:
        array.astype(np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<")).tofile(path)


def read_tensor(directory: Path, spec: TensorSpec, layer, config: ModelConfig, ckpt_tp: int) -> Optional[np.ndarray]:
    """Read one whole tensor as fp32, joining its TP pieces; None for an absent optional one."""
    shape = spec.shape(config)
    paths = [directory / name for name in spec.file_names(ckpt_tp, layer)]
    if not paths[0].exists():
        if spec.optional:
            return None
        raise FileNotFoundError(f"checkpoint file {paths[0]} is missing")
    piece_shape = list(shape)
    if spec.split_axis is not None:
        axis = spec.split_axis % len(shape)
        piece_shape[axis] //= ckpt_tp
    pieces = [read_file(p, tuple(piece_shape), config.weight_data_type) for p in paths]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=spec.split_axis)


def read_file(path: Path, shape: tuple, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        raw = np.fromfile(path, dtype="<u2")
        array = (raw.astype("<u4") << 16).view("<f4")
    else:
        array = np.fromfile(path, dtype=np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<"))
    expected = int(np.prod(shape))
    if array.size != expected:
        raise ValueError(f"{path} holds {array.size} values, expected {expected} for shape {shape}")
    return array.reshape(shape).astype(np.float32)
