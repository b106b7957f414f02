"""HuggingFace checkpoint -> `<output_dir>/<TP>-gpu/` in FasterTransformer's layout.

CLI: `python -m ft_runner.checkpoint.convert --in-dir HF_DIR --out-dir OUT --tp 2 [--weight-data-type fp16]`
(also `python -m ft_runner.convert`). The write is atomic: files go to a temporary sibling
directory that is renamed into place once complete, so a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ft_runner.checkpoint import layout
from ft_runner.checkpoint.families import family_of
from ft_runner.config import WEIGHT_DTYPES, ConfigError


def checkpoint_dir(output_dir: Path, tp: int) -> Path:
    return Path(output_dir) / f"{tp}-gpu"


def convert(hf_dir: Path, output_dir: Path, tp: int, weight_data_type: str = "fp32",
            trust_remote_code: bool = False, log=print) -> Path:
    """Convert once; an existing complete `<TP>-gpu` directory is returned untouched."""
    target = checkpoint_dir(output_dir, tp)
    if (target / "config.ini").exists():
        log(f"[ft_runner] reusing converted checkpoint {target}")
        return target
    import torch
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    make_config, make_tensors = family_of(hf_config)
    name = getattr(hf_config, "_name_or_path", "") or "gpt"
    config = make_config(hf_config, weight_data_type, tp, name)
    if config.head_num % tp:
        raise ConfigError(f"--tp {tp} does not divide the model's {config.head_num} attention heads")
    if config.inter_size % tp:
        raise ConfigError(f"--tp {tp} does not divide the model's FFN size {config.inter_size}")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tied = getattr(hf_config, "tie_word_embeddings", True)
    tensors = make_tensors(model.state_dict(), config, tied)
    del model

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tp}-gpu.tmp-", dir=output_dir))
    try:
        _write(tmp, config, tensors, tp, weight_data_type, log)
        _save_tokenizer(hf_dir, tmp, trust_remote_code)
        config.to_ini(tmp / "config.ini")  # written last: its presence marks a complete directory
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[ft_runner] wrote {target} (TP={tp}, {weight_data_type}, {len(os.listdir(target))} files)")
    return target


def _write(directory: Path, config, tensors: dict, tp: int, dtype: str, log) -> None:
    total = 0
    for spec, layer in layout.all_specs(config):
        name = spec.name.format(i=layer) if layer is not None else spec.name
        if name not in tensors:
            if spec.optional:
                continue
            raise KeyError(f"converter produced no tensor {name}")
        array = tensors[name]
        if array.shape != spec.shape(config):
            raise ValueError(f"{name}: shape {array.shape}, expected {spec.shape(config)}")
        layout.write_tensor(directory, spec, layer, array, tp, dtype)
        total += array.size
    log(f"[ft_runner] converted {total / 1e6:.1f}M parameters")


def _save_tokenizer(hf_dir: Path, directory: Path, trust_remote_code: bool) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(directory)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-dir", "-i", required=True, help="HF model directory or hub id")
    parser.add_argument("--out-dir", "-o", required=True, help="writes OUT/<TP>-gpu/")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to split for")
    parser.add_argument("--weight-data-type", choices=WEIGHT_DTYPES, default="fp32")
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
