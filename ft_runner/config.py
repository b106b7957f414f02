"""The model's shape and variant, as FasterTransformer's config.ini describes it."""

from __future__ import annotations

import configparser
import dataclasses
from pathlib import Path

WEIGHT_DTYPES = ("fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """A model or launch setting that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only model, with FT's `[gpt]` key names and defaults."""

    head_num: int
    size_per_head: int
    inter_size: int
    num_layer: int
    vocab_size: int
    max_pos_seq_len: int
    start_id: int
    end_id: int
    weight_data_type: str = "fp32"
    tensor_para_size: int = 1
    model_name: str = "gpt"
    layernorm_eps: float = 1e-6
    layernorm_type: str = "pre_layernorm"
    activation_type: str = "Gelu"
    has_positional_encoding: bool = True
    has_pre_decoder_layernorm: bool = False
    has_post_decoder_layernorm: bool = True
    use_attention_linear_bias: bool = False

    def __post_init__(self):
        for key in ("head_num", "size_per_head", "inter_size", "num_layer", "vocab_size", "max_pos_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config.ini: {key} must be positive, got {getattr(self, key)}")
        if self.weight_data_type not in WEIGHT_DTYPES:
            raise ConfigError(
                f"config.ini: weight_data_type {self.weight_data_type!r} is not one of {WEIGHT_DTYPES}"
            )
        if self.layernorm_type != "pre_layernorm":
            raise ConfigError(f"config.ini: layernorm_type {self.layernorm_type!r} is not supported yet")
        if self.activation_type.lower() not in ("gelu", "relu"):
            raise ConfigError(f"config.ini: activation_type {self.activation_type!r} is not supported yet")
        if self.use_attention_linear_bias or self.has_pre_decoder_layernorm:
            raise ConfigError("config.ini: ALiBi and pre-decoder layernorm are not supported yet")

    @property
    def hidden_size(self) -> int:
        return self.head_num * self.size_per_head

    def to_ini(self, path: Path) -> None:
        """Write `[gpt]` as FT's converters do (booleans as 0/1)."""
        parser = configparser.ConfigParser()
        parser["gpt"] = {
            f.name: str(int(v)) if isinstance(v, bool) else str(v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        with open(path, "w") as fh:
            parser.write(fh)

    @classmethod
    def from_ini(cls, path: Path) -> "ModelConfig":
        """Read `[gpt]`; keys FT's own converters leave out take FT's defaults."""
        parser = configparser.ConfigParser()
        if not parser.read(path):
            raise ConfigError(f"cannot read {path}")
        if "gpt" not in parser:
            raise ConfigError(f"{path} has no [gpt] section (sections: {parser.sections()})")
        section = parser["gpt"]
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in section:
                continue
            raw = section[field.name]
            if field.type == "bool":
                values[field.name] = raw.strip().lower() in ("1", "true", "yes")
            elif field.type == "int":
                values[field.name] = int(raw)
            elif field.type == "float":
                values[field.name] = float(raw)
            else:
                values[field.name] = raw
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ConfigError(f"{path}: [gpt] lacks required keys {missing}")
        return cls(**values)
