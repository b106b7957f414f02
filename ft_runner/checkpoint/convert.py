"""HuggingFace (or Megatron-LM) checkpoint -> `<output_dir>/<TP>-gpu/` in FasterTransformer's layout.

The HF model type picks a family (families.py) that maps the HF tensors to the names of the layout
table (layout.py); a Megatron-LM directory is merged from its shards (megatron.py).

CLI: `python -m ft_runner.checkpoint.convert --in-dir HF_DIR --out-dir OUT --tp 2 [--weight-data-type fp16]`
(also `python -m ft_runner.convert`). The write is atomic: files go to a temporary sibling
directory that is renamed into place once complete, so a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ft_runner.checkpoint import layout, megatron
from ft_runner.checkpoint.families import Source, family_of
from ft_runner.config import WEIGHT_DTYPES, ConfigError, ModelConfig
from ft_runner.model.quant import quantize_ft_kernel


def checkpoint_dir(output_dir: Path, tp: int) -> Path:
    return Path(output_dir) / f"{tp}-gpu"


def convert(hf_dir: Path, output_dir: Path, tp: int, weight_data_type: str = "fp32",
            trust_remote_code: bool = False, log=print) -> Path:
    """Convert once; an existing complete `<TP>-gpu` directory is returned untouched.

    `hf_dir` is a HuggingFace model directory or a Megatron-LM checkpoint directory.
    """
    target = checkpoint_dir(output_dir, tp)
    if (target / "config.ini").exists():
        log(f"[ft_runner] reusing converted checkpoint {target}")
        return target
    if megatron.is_checkpoint(hf_dir):
        source = _megatron_source(Path(hf_dir), weight_data_type)
    else:
        source = _hf_source(Path(hf_dir), weight_data_type, trust_remote_code)
    config = dataclasses.replace(source.config, tensor_para_size=tp)
    config.check_tp(tp)

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tp}-gpu.tmp-", dir=output_dir))
    try:
        _write(tmp, config, source.tensor, tp, log)
        source.save_tokenizer(tmp)
        config.to_ini(tmp / "config.ini", source.section)  # written last: its presence marks a complete directory
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[ft_runner] wrote {target} (TP={tp}, {weight_data_type}, {len(os.listdir(target))} files)")
    return target


@dataclasses.dataclass
class _Source:
    config: ModelConfig
    section: str  # config.ini section
    tensor: Callable[[str, int | None], np.ndarray | None]  # (layout name, layer) -> FT array or None
    save_tokenizer: Callable[[Path], None]


def _hf_source(hf_dir: Path, weight_data_type: str, trust_remote_code: bool) -> _Source:
    import torch
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    family = family_of(hf_config)
    name = getattr(hf_config, "_name_or_path", "") or "gpt"
    config = ModelConfig(model_name=name, weight_data_type=weight_data_type, **family.config(hf_config))
    state = {}  # loaded on first use, once the config has been checked

    def tensor(spec_name: str, layer: int | None):
        if not state:
            state.update(transformers.AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=torch.float32, trust_remote_code=trust_remote_code).state_dict())
        if spec_name not in family.tensors:
            raise KeyError(f"the {hf_config.model_type} converter has no rule for FT tensor {spec_name}")
        return family.tensors[spec_name](Source(state, hf_config, layer))

    def save_tokenizer(directory: Path) -> None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(directory)

    return _Source(config, family.section, tensor, save_tokenizer)


def _megatron_source(path: Path, weight_data_type: str) -> _Source:
    checkpoint = megatron.MegatronCheckpoint(path, weight_data_type)

    def tensor(spec_name: str, layer: int | None):
        return checkpoint.tensors.get(spec_name.format(i=layer))

    return _Source(checkpoint.config, "gpt", tensor, checkpoint.save_tokenizer)


def _write(directory: Path, config: ModelConfig, tensor, tp: int, log) -> None:
    """Every tensor of the layout; an int8 checkpoint's kernels quantized whole (per output channel
    over all of their inputs), then cut, their scales beside them."""
    total = 0
    for spec, layer in layout.all_specs(config):
        name = spec.name.format(i=layer) if layer is not None else spec.name
        array = tensor(spec.name, layer)
        if array is None:
            if spec.fallback:
                continue
            raise KeyError(f"converter produced no tensor {name}")
        if array.shape != spec.shape(config):
            raise ValueError(f"{name}: shape {array.shape}, expected {spec.shape(config)}")
        if spec.kernel and config.weight_data_type == "int8":
            array, scale = quantize_ft_kernel(array)
            scales = layout.scale_spec(spec)
            layout.write_tensor(directory, scales, layer, scale, tp, layout.file_dtype(scales, config), config)
        layout.write_tensor(directory, spec, layer, array, tp, layout.file_dtype(spec, config), config)
        total += array.size
    log(f"[ft_runner] converted {total / 1e6:.1f}M parameters")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-dir", "-i", required=True, help="HF model directory, hub id or Megatron-LM checkpoint")
    parser.add_argument("--out-dir", "-o", required=True, help="writes OUT/<TP>-gpu/")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to split for")
    parser.add_argument("--weight-data-type", choices=WEIGHT_DTYPES, default="fp32",
                        help="int8: the layers' kernels per-output-channel int8 with fp32 scales, every other "
                             "tensor fp16 (served with --quantization int8_wo)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    from ft_runner.hub import resolve_model

    try:
        source = resolve_model(args.in_dir, revision=args.revision)
        convert(source.path, Path(args.out_dir), args.tp, args.weight_data_type, args.trust_remote_code)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
