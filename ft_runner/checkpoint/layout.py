"""FasterTransformer's checkpoint layout: one table for the converter and the loader.

Every file is the raw little-endian bytes of one array, no header. 2-D kernels are stored
[in, out]. A tensor with a split is cut into TP pieces saved as `<name>.<tp_rank>.bin`; the others
are saved once as `<name>.bin` (FT ft_format.md §2.1). Which tensors exist depends on the model's
variant flags (biases, norm type, gated MLP, ...), so each entry says when it is present and where
the loader puts it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ft_runner.config import ModelConfig

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


@dataclasses.dataclass(frozen=True)
class Axis:
    """Cut into TP equal pieces along one axis."""

    axis: int

    def piece_shape(self, shape: tuple, tp: int, config: ModelConfig) -> tuple:
        out = list(shape)
        out[self.axis] //= tp
        return tuple(out)

    def split(self, array: np.ndarray, tp: int, config: ModelConfig) -> list[np.ndarray]:
        return np.split(array, tp, axis=self.axis)

    def join(self, pieces: list[np.ndarray], config: ModelConfig) -> np.ndarray:
        return np.concatenate(pieces, axis=self.axis)


def kv_slice(config: ModelConfig, tp_rank: int, tp: int) -> slice:
    """The KV heads the query heads of `tp_rank` read: its share, or the one head its group shares."""
    if config.kv_heads >= tp:
        n = config.kv_heads // tp
        return slice(tp_rank * n, (tp_rank + 1) * n)
    head = tp_rank * config.kv_heads // tp
    return slice(head, head + 1)


@dataclasses.dataclass(frozen=True)
class QKV:
    """Axis -2 lists heads as [q heads | k heads | v heads]; a rank's piece is its query heads followed
    by the KV heads they read. For multi-head attention this is FT's `[H, 3, H/TP]`, byte for byte."""

    def piece_shape(self, shape: tuple, tp: int, config: ModelConfig) -> tuple:
        return (*shape[:-2], config.head_num // tp + 2 * config.local_kv_heads(tp), shape[-1])

    def split(self, array: np.ndarray, tp: int, config: ModelConfig) -> list[np.ndarray]:
        q, k, v = np.split(array, [config.head_num, config.head_num + config.kv_heads], axis=-2)
        per = config.head_num // tp
        pieces = []
        for r in range(tp):
            kv = kv_slice(config, r, tp)
            pieces.append(np.concatenate([q[..., r * per:(r + 1) * per, :], k[..., kv, :], v[..., kv, :]], axis=-2))
        return pieces

    def join(self, pieces: list[np.ndarray], config: ModelConfig) -> np.ndarray:
        tp, heads, kv_heads = len(pieces), config.head_num, config.kv_heads
        per, local = heads // tp, config.local_kv_heads(tp)
        whole = np.empty((*pieces[0].shape[:-2], heads + 2 * kv_heads, pieces[0].shape[-1]), pieces[0].dtype)
        for r, piece in enumerate(pieces):  # a replicated KV head is written once per copy: all equal
            kv = kv_slice(config, r, tp)
            whole[..., r * per:(r + 1) * per, :] = piece[..., :per, :]
            whole[..., heads + kv.start:heads + kv.stop, :] = piece[..., per:per + local, :]
            whole[..., heads + kv_heads + kv.start:heads + kv_heads + kv.stop, :] = piece[..., per + local:, :]
        return whole


def _always(config: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str  # file name without `model.` and `.bin`; `{i}` is the layer index
    shape: Callable[[ModelConfig], tuple]  # the whole (unsplit) tensor
    split: Axis | QKV | None = None  # None: one copy shared by every TP rank
    when: Callable[[ModelConfig], bool] = _always  # is the tensor part of this model?
    param: str = ""  # the parameter it loads into, relative to the stage (global) or the block (layer)
    kernel: bool = False  # a [in, out] kernel: the loader transposes it to torch's [out, in]
    vocab: bool = False  # rows are the vocabulary: stored whole, padded and cut per rank by the loader
    fallback: str = ""  # read this tensor instead when the file is absent (lm_head -> wte: tied)
    dtype: str = ""  # the files' dtype; "": the config's (ModelConfig.file_dtype)

    def file_names(self, tp: int, layer: int | None = None) -> list[str]:
        name = self.name.format(i=layer) if layer is not None else self.name
        if self.split is None:
            return [f"model.{name}.bin"]
        return [f"model.{name}.{r}.bin" for r in range(tp)]


def _h(c):
    return c.hidden_size


def _qkv_heads(c):
    return c.head_num + 2 * c.kv_heads


def _ln_bias(flag: str):
    return lambda c: getattr(c, flag) and c.norm_type == "layernorm"


GLOBAL_TENSORS = (
    TensorSpec("wte", lambda c: (c.vocab_size, _h(c)), param="wte.weight", vocab=True),
    TensorSpec("wpe", lambda c: (c.max_pos_seq_len, _h(c)), when=lambda c: c.has_positional_encoding,
               param="wpe.weight"),
    TensorSpec("pre_decoder_layernorm.weight", lambda c: (_h(c),), when=lambda c: c.has_pre_decoder_layernorm,
               param="ln_embed.weight"),
    TensorSpec("pre_decoder_layernorm.bias", lambda c: (_h(c),), when=_ln_bias("has_pre_decoder_layernorm"),
               param="ln_embed.bias"),
    TensorSpec("final_layernorm.weight", lambda c: (_h(c),), when=lambda c: c.has_post_decoder_layernorm,
               param="ln_f.weight"),
    TensorSpec("final_layernorm.bias", lambda c: (_h(c),), when=_ln_bias("has_post_decoder_layernorm"),
               param="ln_f.bias"),
    TensorSpec("lm_head.weight", lambda c: (c.vocab_size, _h(c)), param="lm_head.weight", vocab=True,
               fallback="wte"),  # FT: absent means tied to wte
    TensorSpec("lm_head.bias", lambda c: (c.vocab_size,), when=lambda c: c.has_lm_head_bias,
               param="lm_head.bias", vocab=True),
)


def _plain(flag: str = ""):
    return lambda c: not c.gated and (not flag or getattr(c, flag))


def _gated(flag: str = ""):
    return lambda c: c.gated and (not flag or getattr(c, flag))


LAYER_TENSORS = (
    TensorSpec("layers.{i}.input_layernorm.weight", lambda c: (_h(c),), param="ln1.weight"),
    TensorSpec("layers.{i}.input_layernorm.bias", lambda c: (_h(c),), when=lambda c: c.norm_type == "layernorm",
               param="ln1.bias"),
    TensorSpec("layers.{i}.attention.query_key_value.weight", lambda c: (_h(c), _qkv_heads(c), c.size_per_head),
               QKV(), param="attn.qkv.weight", kernel=True),
    TensorSpec("layers.{i}.attention.query_key_value.bias", lambda c: (_qkv_heads(c), c.size_per_head),
               QKV(), when=lambda c: c.has_qkv_bias, param="attn.qkv.bias"),
    TensorSpec("layers.{i}.attention.dense.weight", lambda c: (c.head_num * c.size_per_head, _h(c)), Axis(0),
               param="attn.dense.weight", kernel=True),
    TensorSpec("layers.{i}.attention.dense.bias", lambda c: (_h(c),), when=lambda c: c.has_attention_out_bias,
               param="attn.dense.bias"),
    TensorSpec("layers.{i}.post_attention_layernorm.weight", lambda c: (_h(c),),
               when=lambda c: c.has_post_attention_layernorm, param="ln2.weight"),
    TensorSpec("layers.{i}.post_attention_layernorm.bias", lambda c: (_h(c),),
               when=_ln_bias("has_post_attention_layernorm"), param="ln2.bias"),
    # plain MLP: fc2(act(fc1(x)))
    TensorSpec("layers.{i}.mlp.dense_h_to_4h.weight", lambda c: (_h(c), c.inter_size), Axis(-1), when=_plain(),
               param="mlp.fc1.weight", kernel=True),
    TensorSpec("layers.{i}.mlp.dense_h_to_4h.bias", lambda c: (c.inter_size,), Axis(-1),
               when=_plain("has_mlp_bias"), param="mlp.fc1.bias"),
    TensorSpec("layers.{i}.mlp.dense_4h_to_h.weight", lambda c: (c.inter_size, _h(c)), Axis(0), when=_plain(),
               param="mlp.fc2.weight", kernel=True),
    TensorSpec("layers.{i}.mlp.dense_4h_to_h.bias", lambda c: (_h(c),), when=_plain("has_mlp_bias"),
               param="mlp.fc2.bias"),
    # gated MLP, named as FT's community LLaMA forks did: down_proj(act(gate_proj(x)) * up_proj(x))
    TensorSpec("layers.{i}.mlp.gate_proj.weight", lambda c: (_h(c), c.inter_size), Axis(-1), when=_gated(),
               param="mlp.fc1.weight", kernel=True),
    TensorSpec("layers.{i}.mlp.gate_proj.bias", lambda c: (c.inter_size,), Axis(-1),
               when=_gated("has_mlp_bias"), param="mlp.fc1.bias"),
    TensorSpec("layers.{i}.mlp.up_proj.weight", lambda c: (_h(c), c.inter_size), Axis(-1), when=_gated(),
               param="mlp.up.weight", kernel=True),
    TensorSpec("layers.{i}.mlp.up_proj.bias", lambda c: (c.inter_size,), Axis(-1),
               when=_gated("has_mlp_bias"), param="mlp.up.bias"),
    TensorSpec("layers.{i}.mlp.down_proj.weight", lambda c: (c.inter_size, _h(c)), Axis(0), when=_gated(),
               param="mlp.fc2.weight", kernel=True),
    TensorSpec("layers.{i}.mlp.down_proj.bias", lambda c: (_h(c),), when=_gated("has_mlp_bias"),
               param="mlp.fc2.bias"),
)


def scale_spec(spec: TensorSpec) -> TensorSpec:
    """The fp32 per-output-channel scales of a kernel in an int8 checkpoint (`<prefix>.scale_w_quant_orig`,
    as FT's SmoothQuant converters name the weights' quantized-to-original scales): shaped as the
    kernel's output axes and cut as them (a column-parallel kernel's scales are cut with its columns,
    QKV's as its bias; a row-parallel kernel's are whole on every rank: a channel's scale covers all
    of its inputs, so it does not depend on the TP)."""
    assert spec.kernel, spec.name
    row_parallel = isinstance(spec.split, Axis) and spec.split.axis == 0
    return TensorSpec(spec.name.removesuffix(".weight") + ".scale_w_quant_orig", lambda c: spec.shape(c)[1:],
                      None if row_parallel else spec.split, spec.when, param=spec.param + "_scale", dtype="fp32")


def file_dtype(spec: TensorSpec, config: ModelConfig) -> str:
    return spec.dtype or config.file_dtype(spec.kernel)


def global_specs(config: ModelConfig) -> list[TensorSpec]:
    return [spec for spec in GLOBAL_TENSORS if spec.when(config)]


def layer_specs(config: ModelConfig) -> list[TensorSpec]:
    return [spec for spec in LAYER_TENSORS if spec.when(config)]


def all_specs(config: ModelConfig):
    """Yield (spec, layer) for every tensor of the model (an int8 checkpoint's scales aside: see
    scale_spec); layer is None for global tensors."""
    for spec in global_specs(config):
        yield spec, None
    for layer in range(config.num_layer):
        for spec in layer_specs(config):
            yield spec, layer


def write_tensor(directory: Path, spec: TensorSpec, layer, array: np.ndarray, tp: int, dtype: str,
                 config: ModelConfig) -> None:
    """Save one whole tensor, cut into TP pieces where the spec says so."""
    pieces = [array] if spec.split is None else spec.split.split(array, tp, config)
    for file_name, piece in zip(spec.file_names(tp, layer), pieces, strict=True):
        _to_file(np.ascontiguousarray(piece), directory / file_name, dtype)


def _to_file(array: np.ndarray, path: Path, dtype: str) -> None:
    if dtype == "bf16":  # numpy has no bfloat16: keep the upper half of each fp32, rounded to nearest even
        bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        rounded.tofile(path)
    else:
        array.astype(np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<")).tofile(path)


def exists(directory: Path, spec: TensorSpec, layer, ckpt_tp: int) -> bool:
    return (directory / spec.file_names(ckpt_tp, layer)[0]).exists()


def read_piece(directory: Path, spec: TensorSpec, layer, config: ModelConfig, ckpt_tp: int,
               tp_rank: int) -> np.ndarray:
    """One rank's file of a split tensor, as fp32 (int8 kernels as int8)."""
    path = directory / spec.file_names(ckpt_tp, layer)[tp_rank]
    return read_file(path, spec.split.piece_shape(spec.shape(config), ckpt_tp, config), file_dtype(spec, config))


def read_tensor(directory: Path, spec: TensorSpec, layer, config: ModelConfig, ckpt_tp: int) -> np.ndarray:
    """Read one whole tensor as fp32 (int8 kernels as int8), joining its TP pieces."""
    if not exists(directory, spec, layer, ckpt_tp):
        raise FileNotFoundError(f"checkpoint file {directory / spec.file_names(ckpt_tp, layer)[0]} is missing")
    if spec.split is None:
        path = directory / spec.file_names(ckpt_tp, layer)[0]
        return read_file(path, spec.shape(config), file_dtype(spec, config))
    pieces = [read_piece(directory, spec, layer, config, ckpt_tp, r) for r in range(ckpt_tp)]
    return spec.split.join(pieces, config)


def read_file(path: Path, shape: tuple, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        raw = np.fromfile(path, dtype="<u2")
        array = (raw.astype("<u4") << 16).view("<f4")
    else:
        array = np.fromfile(path, dtype=np.dtype(NUMPY_DTYPES[dtype]).newbyteorder("<"))
    expected = int(np.prod(shape))
    if array.size != expected:
        raise ValueError(f"{path} holds {array.size} values, expected {expected} for shape {shape}")
    return array.reshape(shape) if dtype == "int8" else array.reshape(shape).astype(np.float32)
