"""The model's shape and variant, as FasterTransformer's config.ini describes it."""

from __future__ import annotations

import configparser
import dataclasses
import json
from pathlib import Path

FLOAT_DTYPES = ("fp32", "fp16", "bf16")
# int8: the decoder layers' kernels are per-output-channel int8 with fp32 scales, the other tensors in
# `float_data_type` (README, "Quantized serving")
WEIGHT_DTYPES = (*FLOAT_DTYPES, "int8")
QUANTIZATIONS = ("none", "int8_wo", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")
# FT's activation names; `GeluExact` is the erf form (FT's `Gelu` is the tanh form), `*GLU` are gated.
ACTIVATIONS = ("Gelu", "GeluExact", "Relu", "Silu", "GeGLU", "SiGLU")
_ACTIVATION_ALIASES = {**{a.lower(): a for a in ACTIVATIONS}, "gated-gelu": "GeGLU", "gated-silu": "SiGLU"}
NORM_TYPES = ("layernorm", "rmsnorm")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

# config.ini sections FT and its community forks used, and the defaults of keys their own converters
# left out (FT's GPT-J writes no max_pos_seq_len and implies rotary, parallel residual, no QKV bias).
SECTIONS = {
    "gpt": {},
    "gptj": dict(max_pos_seq_len=2048, layernorm_eps=1e-5, has_positional_encoding=False, rotary_embedding=64,
                 neox_rotary_style=False, use_gptj_residual=True, has_post_attention_layernorm=False,
                 has_qkv_bias=False, has_attention_out_bias=False, has_lm_head_bias=True),
    "gptneox": dict(max_pos_seq_len=2048, layernorm_eps=1e-5, activation_type="GeluExact",
                    has_positional_encoding=False, use_gptj_residual=True),
    "llama": dict(max_pos_seq_len=2048, layernorm_eps=1e-6, norm_type="rmsnorm", activation_type="SiGLU",
                  has_positional_encoding=False, has_qkv_bias=False, has_attention_out_bias=False,
                  has_mlp_bias=False),
}


class ConfigError(ValueError):
    """A model or launch setting that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only model, with FT's config.ini key names and defaults.

    The FT GPT keys come first; the rest describe the families FT ran as separate models (GPT-J,
    GPT-NeoX) or that its community forks added (LLaMA): rotary embeddings, grouped KV heads,
    RMSNorm, gated MLPs, which biases exist, sliding-window attention.
    """

    head_num: int
    size_per_head: int
    inter_size: int
    num_layer: int
    vocab_size: int
    max_pos_seq_len: int
    start_id: int
    end_id: int
    extra_end_ids: str = ""  # comma-separated: the model's other end tokens (Llama 3's <|eot_id|>, ...)
    weight_data_type: str = "fp32"
    float_data_type: str = "fp16"  # an int8 checkpoint's embeddings, norms, biases and LM head
    tensor_para_size: int = 1
    model_name: str = "gpt"
    layernorm_eps: float = 1e-6
    layernorm_type: str = "pre_layernorm"  # or post_layernorm (OPT-350m): where the norms sit
    activation_type: str = "Gelu"
    has_positional_encoding: bool = True  # a learned wpe table
    has_pre_decoder_layernorm: bool = False  # BLOOM's embedding layernorm
    has_post_decoder_layernorm: bool = True  # the final layernorm
    use_attention_linear_bias: bool = False  # ALiBi
    kv_head_num: int = 0  # 0: as many KV heads as query heads
    norm_type: str = "layernorm"  # or rmsnorm
    rotary_embedding: int = 0  # rotary dims at the start of each head; 0: no rotary
    neox_rotary_style: bool = True  # rotate halves (NeoX, LLaMA); False: interleaved pairs (GPT-J)
    rope_theta: float = 10000.0
    rope_scaling: str = ""  # JSON: {"rope_type": "linear" | "dynamic" | "llama3" | "yarn", "factor": ...}
    use_gptj_residual: bool = False  # attention and MLP in parallel off the same residual
    has_post_attention_layernorm: bool = True  # False: GPT-J's MLP reads the input layernorm's output
    has_qkv_bias: bool = True
    has_attention_out_bias: bool = True
    has_mlp_bias: bool = True
    has_lm_head_bias: bool = False
    sliding_window: int = 0  # 0: none; else a query sees the last `sliding_window` positions
    max_window_layers: int = 0  # the window applies to layers >= this one (Qwen2)
    hidden_units: int = 0  # residual width; 0: head_num * size_per_head (some LLaMA-family models differ)

    def __post_init__(self):
        for key in ("head_num", "size_per_head", "inter_size", "num_layer", "vocab_size", "max_pos_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config.ini: {key} must be positive, got {getattr(self, key)}")
        self._check_choice("weight_data_type", WEIGHT_DTYPES)
        self._check_choice("float_data_type", FLOAT_DTYPES)
        self._check_choice("layernorm_type", ("pre_layernorm", "post_layernorm"))
        self._check_choice("activation_type", ACTIVATIONS)
        self._check_choice("norm_type", NORM_TYPES)
        if self.kv_head_num < 0 or self.head_num % self.kv_heads:
            raise ConfigError(f"config.ini: head_num {self.head_num} is not a multiple of kv_head_num {self.kv_head_num}")
        if self.rotary_embedding % 2 or not 0 <= self.rotary_embedding <= self.size_per_head:
            raise ConfigError(f"config.ini: rotary_embedding {self.rotary_embedding} must be even and at most "
                              f"size_per_head {self.size_per_head}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"config.ini: rope_scaling type {self.rope_type!r} is not supported; "
                              f"supported: {ROPE_TYPES}")
        if self.sliding_window < 0:
            raise ConfigError(f"config.ini: sliding_window must be 0 (none) or positive, got {self.sliding_window}")

    def _check_choice(self, key: str, allowed: tuple) -> None:
        if getattr(self, key) not in allowed:
            raise ConfigError(f"config.ini: {key} {getattr(self, key)!r} is not one of {allowed}")

    def file_dtype(self, kernel: bool) -> str:
        """The dtype of a tensor's files: an int8 checkpoint stores only the layers' kernels in int8."""
        if self.weight_data_type != "int8":
            return self.weight_data_type
        return "int8" if kernel else self.float_data_type

    @property
    def hidden_size(self) -> int:
        return self.hidden_units or self.head_num * self.size_per_head

    @property
    def kv_heads(self) -> int:
        return self.kv_head_num or self.head_num

    @property
    def gated(self) -> bool:
        """Gated MLP (SwiGLU, GeGLU): down(act(gate(x)) * up(x))."""
        return self.activation_type.endswith("GLU")

    @property
    def rope_params(self) -> dict:
        try:
            return json.loads(self.rope_scaling) if self.rope_scaling else {}
        except json.JSONDecodeError:
            raise ConfigError(f"config.ini: rope_scaling {self.rope_scaling!r} is not JSON") from None

    @property
    def other_end_ids(self) -> tuple[int, ...]:
        """End tokens besides end_id: each ends a row as end_id does, for rows that keep the model's end_id."""
        try:
            return tuple(int(i) for i in self.extra_end_ids.split(",") if i.strip())
        except ValueError:
            raise ConfigError(f"config.ini: extra_end_ids {self.extra_end_ids!r} is not a list of token ids") from None

    @property
    def rope_type(self) -> str:
        return self.rope_params.get("rope_type", "default")

    def window(self, layer: int) -> int:
        """The sliding window of one layer; 0 for full attention."""
        return self.sliding_window if layer >= self.max_window_layers else 0

    def local_kv_heads(self, tp: int) -> int:
        """KV heads per rank: a share of them, or one replicated head when there are fewer than TP."""
        return max(1, self.kv_heads // tp)

    def check_tp(self, tp: int) -> None:
        """Raise ConfigError unless the model can be split over `tp` ranks."""
        if self.head_num % tp:
            raise ConfigError(f"--tp {tp} does not divide the model's {self.head_num} attention heads")
        if self.kv_heads % tp and tp % self.kv_heads:
            raise ConfigError(f"--tp {tp} and the model's {self.kv_heads} KV heads: one must divide the other")
        if self.inter_size % tp:
            raise ConfigError(f"--tp {tp} does not divide the model's FFN size {self.inter_size}")

    def to_ini(self, path: Path, section: str = "gpt") -> None:
        """Write one section (`gpt`, `gptj`, `gptneox` or `llama`) as FT's converters do (booleans as 0/1)."""
        parser = configparser.ConfigParser(interpolation=None)
        parser[section] = {
            f.name: str(int(v)) if isinstance(v, bool) else str(v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        with open(path, "w") as fh:
            parser.write(fh)

    @classmethod
    def from_ini(cls, path: Path) -> ModelConfig:
        """Read the model's section; keys FT's own converters leave out take FT's defaults for that section."""
        name, section = read_section(path)
        values = dict(SECTIONS[name])
        for field in dataclasses.fields(cls):
            if field.name in section:
                values[field.name] = _parse(field.type, section[field.name])
        activation = values.get("activation_type", "Gelu")
        values["activation_type"] = _ACTIVATION_ALIASES.get(activation.lower(), activation)  # FT reads any case
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ConfigError(f"{path}: [{name}] lacks required keys {missing}")
        return cls(**values)


def read_section(path: Path) -> tuple[str, configparser.SectionProxy]:
    """The one model section of a config.ini, with its name."""
    parser = configparser.ConfigParser(interpolation=None)
    if not parser.read(path):
        raise ConfigError(f"cannot read {path}")
    found = [s for s in SECTIONS if s in parser]
    if not found:
        raise ConfigError(f"{path} has none of the sections {['[' + s + ']' for s in SECTIONS]} "
                          f"(sections: {parser.sections()})")
    return found[0], parser[found[0]]


def _parse(kind: str, raw: str):
    if kind == "bool":
        return raw.strip().lower() in ("1", "true", "yes")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The in-flight engine's knobs (server flags of the same names), checked once here."""

    max_num_seqs: int = 256  # requests in the running batch at most
    max_num_batched_tokens: int = 8192  # tokens one step computes at most: prefill chunks and decodes together
    kv_block_size: int = 16  # tokens per KV-cache page
    gpu_memory_utilization: float = 0.9  # fraction of the device memory the weights, activations and cache may use
    kv_cache_blocks: int = 0  # pages in the cache; 0: size it from free memory (on CPUs: cpu_kv_cache_gib)
    cpu_kv_cache_gib: float = 1.0  # the cache's size on CPUs when kv_cache_blocks is 0
    max_model_len: int = 0  # prompt + output tokens of one request at most; 0: the model's context
    enable_chunked_prefill: bool = True  # long prompts are split over steps to fit the token budget
    cuda_graphs: bool = True  # decode-only steps replay captured graphs (GPUs only)
    enable_prefix_caching: bool = True  # full KV pages of a prompt are reused by later prompts that start alike

    def __post_init__(self):
        for key in ("max_num_seqs", "max_num_batched_tokens", "kv_block_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if self.kv_block_size & (self.kv_block_size - 1) or self.kv_block_size < 8:
            raise ConfigError(f"--kv-block-size must be a power of two >= 8, got {self.kv_block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_blocks < 0 or self.max_model_len < 0 or self.cpu_kv_cache_gib <= 0:
            raise ConfigError("--kv-cache-blocks and --max-model-len must be >= 0 (0: automatic)")

    def model_len(self, model: ModelConfig) -> int:
        """The longest request (prompt + output) this engine serves: the model's context unless
        given; learned position tables end there, rotary and ALiBi models may be asked for more."""
        length = self.max_model_len or model.max_pos_seq_len
        return min(length, model.max_pos_seq_len) if model.has_positional_encoding else length


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """Rank 0's limits on requests (server flags of the same names), checked once here; every API applies them."""

    request_timeout_s: float = 0.0  # a request's deadline from its arrival; 0: none (a request may ask for less)
    max_queue_len: int = 0  # a request is refused while this many rows already wait for the engine; 0: no limit
    max_concurrent_requests: int = 256  # OpenAI API: requests in flight (running or waiting) at most

    def __post_init__(self):
        if not 0 <= self.request_timeout_s < float("inf"):
            raise ConfigError(f"--request-timeout-s must be a number of seconds >= 0 (0: no deadline), "
                              f"got {self.request_timeout_s}")
        if self.max_queue_len < 0:
            raise ConfigError(f"--max-queue-len must be >= 0 (0: no limit), got {self.max_queue_len}")
        if self.max_concurrent_requests < 1:
            raise ConfigError(f"--max-concurrent-requests must be at least 1, got {self.max_concurrent_requests}")

    def timeout_for(self, requested_s: float | None) -> float | None:
        """A request's deadline in seconds: its own `requested_s` or the server's, the shorter; None: none."""
        limits = [t for t in (requested_s, self.request_timeout_s) if t]
        return min(limits) if limits else None


# FP8 (e4m3) matrix products and conversions: Ada (8.9) and Hopper (9.0) or newer
FP8_MIN_CAPABILITY = (8, 9)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Reduced-precision serving, decided here once for every entry point (server flags of the same
    names, ParallelGPT's int8_mode, the benchmarks).

    quantization: `int8_wo`, int8 weights with per-output-channel scales and activations in the
    model dtype (FT's int8_mode 1); `fp8`, e4m3 weights with per-output-channel scales and e4m3
    activations with per-token scales computed on the fly. Only the decoder layers' projections are
    quantized: embeddings, norms, biases and the LM head stay in the model dtype.
    kv_cache_dtype: `fp8` stores the in-flight engine's paged KV cache in e4m3 (one scale per layer
    for keys and one for values); `auto`, the model dtype.
    emulate_fp8: tests only: run fp8 through the torch references on a device without FP8.
    """

    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    emulate_fp8: bool = False

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization {self.quantization!r} is not one of {QUANTIZATIONS}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")

    @classmethod
    def from_flags(cls, quantization: str | None = None, int8_mode: int = 0, kv_cache_dtype: str = "auto",
                   weight_data_type: str | None = None) -> QuantConfig:
        """From `--quantization`, FT's `--int8-mode` (1 = int8_wo) and `--kv-cache-dtype`; an int8
        checkpoint (`--weight-data-type int8`) implies int8_wo."""
        if int8_mode not in (0, 1):
            raise ConfigError(f"--int8-mode {int8_mode}: only FT's weight-only mode 1 is supported "
                              "(mode 2, SmoothQuant, is not); use --quantization int8_wo or fp8")
        implied = "int8_wo" if int8_mode == 1 or weight_data_type == "int8" else None
        if quantization is not None and implied is not None and quantization != implied:
            source = "--int8-mode 1" if int8_mode else "--weight-data-type int8"
            raise ConfigError(f"{source} means --quantization int8_wo, not {quantization}")
        return cls(quantization or implied or "none", kv_cache_dtype)

    @property
    def needs_fp8(self) -> bool:
        return self.quantization == "fp8" or self.kv_cache_dtype == "fp8"

    def check_device(self, device) -> None:
        """Refuse fp8 (weights or KV cache) where the device has no FP8 (CPUs, GPUs before sm_89)."""
        if not self.needs_fp8 or self.emulate_fp8:
            return
        flags = " and ".join(f for f, on in (("--quantization fp8", self.quantization == "fp8"),
                                             ("--kv-cache-dtype fp8", self.kv_cache_dtype == "fp8")) if on)
        need = f"FP8 needs a GPU of compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer " \
               "(Ada, Hopper)"
        if device.type != "cuda":
            raise ConfigError(f"{flags}: {need}, and this rank runs on the {device.type}; use --quantization "
                              "int8_wo (or serve unquantized)")
        import torch

        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < FP8_MIN_CAPABILITY:
            raise ConfigError(f"{flags}: {need}; {torch.cuda.get_device_name(device)} is sm_{capability[0]}"
                              f"{capability[1]}; use --quantization int8_wo")
