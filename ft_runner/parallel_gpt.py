"""A drop-in for FasterTransformer's ParallelGPT (FT examples/pytorch/gpt/utils/parallel_gpt.py;
ft_format.md §3.1): scripts written against FT's examples run by changing one import.

    from ft_runner.parallel_gpt import ParallelGPT      # was: from examples.pytorch.gpt.utils.parallel_gpt ...
    gpt = ParallelGPT(head_num, size_per_head, vocab_size, start_id, end_id, layer_num, max_seq_len,
                      tensor_para_size, pipeline_para_size, lib_path, inference_data_type="fp32")
    gpt.load(ckpt_path="c-model/gpt2/2-gpu")
    output_ids, lengths, cum = gpt(start_ids, start_lengths, output_len, beam_width=1, top_k=..., ...,
                                   return_output_length=True, return_cum_log_probs=1)

Launch with `mpirun -n TP*PP`; every rank builds the model and calls forward, as in FT. The
constructor starts torch.distributed (gloo on CPUs, NCCL on GPUs); `lib_path` is accepted and
unused (there is no .so). Rank 0's forward arguments are the ones run: they are checked on every
rank, then broadcast, so the ranks stay in step even if their copies differ. Every rank gets the
outputs, on its device: output_ids int32 [B, beam, S + output_len] (prompt, generation, end_id
padding), sequence_lengths int32 [B, beam], cum_log_probs float32 [B, beam].
"""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ft_runner import parallel
from ft_runner.config import QuantConfig
from ft_runner.engine.beam import with_beam_axis
from ft_runner.engine.generator import Batch, Generator
from ft_runner.serving.protocol import Channel
from ft_runner.serving.validation import Limits, RequestError, check_params, check_rows, make_batch

# forward() argument -> the request input name validation.py checks it under
_ARGS = {"top_k": "runtime_top_k", "top_p": "runtime_top_p", "beam_search_diversity_rate": "beam_search_diversity_rate",
         "temperature": "temperature", "len_penalty": "len_penalty", "repetition_penalty": "repetition_penalty",
         "presence_penalty": "presence_penalty", "min_length": "min_length", "random_seed": "random_seed"}


class ParallelGPT(torch.nn.Module):
    def __init__(self, head_num: int, size_per_head: int, vocab_size: int, start_id: int, end_id: int,
                 layer_num: int, max_seq_len: int, tensor_para_size: int, pipeline_para_size: int,
                 lib_path=None, inference_data_type: str = "fp32", inter_size: int = 0,
                 layernorm_eps: float = 1e-6, layernorm_type: str = "pre_layernorm", activation_type: str = "Gelu",
                 gpt_with_moe: bool = False, expert_num: int = 0, moe_k: int = 0, moe_layer_index=(),
                 has_positional_encoding: bool = True, has_pre_decoder_layernorm: bool = False,
                 has_post_decoder_layernorm: bool = True, has_adapters: bool = False, adapter_inter_size: int = 0,
                 use_attention_linear_bias: bool = False, int8_mode: int = 0, weights_data_type=np.float32,
                 shared_contexts_ratio: float = 1.0, device: str = "auto"):
        super().__init__()
        unsupported = {"gpt_with_moe": gpt_with_moe, "has_adapters": has_adapters}
        for name, value in unsupported.items():
            if value:
                raise ValueError(f"{name}={value!r} is not supported by ft_runner's ParallelGPT")
        if inference_data_type not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"inference_data_type {inference_data_type!r} must be one of fp32, fp16, bf16")
        if head_num % tensor_para_size or layer_num % pipeline_para_size:
            raise ValueError(f"tensor_para_size {tensor_para_size} must divide head_num {head_num} and "
                             f"pipeline_para_size {pipeline_para_size} must divide layer_num {layer_num}")
        self.head_num, self.size_per_head, self.vocab_size = head_num, size_per_head, vocab_size
        self.start_id, self.end_id, self.layer_num, self.max_seq_len = start_id, end_id, layer_num, max_seq_len
        self.tensor_para_size, self.pipeline_para_size = tensor_para_size, pipeline_para_size
        self.inference_data_type = inference_data_type
        self.quant = QuantConfig.from_flags(int8_mode=int8_mode)  # FT's int8_mode 1: int8 weights, fp activations
        self.runtime = parallel.init_runtime(tensor_para_size, pipeline_para_size, device)
        # FT scripts just end: close torch.distributed before the interpreter does, so no collective's
        # background thread outlives it
        atexit.register(parallel.shutdown, self.runtime)
        grid = self.runtime.grid
        self.rank, self.world_size = grid.rank, grid.world
        self.tp_rank, self.pp_rank = grid.tp_rank, grid.pp_rank
        self.device = self.runtime.device
        self.generator: Optional[Generator] = None
        self.channel = Channel(self.runtime.comm)

    def load(self, ckpt_path: str) -> bool:
        """Load this rank's shard of an FT checkpoint directory; False if it does not exist (as FT)."""
        from ft_runner.checkpoint.load import load_stage, read_config

        path = Path(ckpt_path)
        if not (path / "config.ini").exists():
            return False
        config, _ = read_config(path)
        wanted = {"head_num": self.head_num, "size_per_head": self.size_per_head, "vocab_size": self.vocab_size,
                  "num_layer": self.layer_num}
        for key, value in wanted.items():
            if getattr(config, key) != value:
                raise ValueError(f"{path}/config.ini has {key} = {getattr(config, key)} but ParallelGPT was "
                                 f"built with {value}")
        stage = load_stage(path, self.runtime.grid, self.runtime.tp_group, self.inference_data_type, self.device,
                           self.quant)
        self.generator = Generator(stage, self.runtime)
        self.limits = Limits(config.vocab_size, min(self.max_seq_len, config.max_pos_seq_len), self.start_id,
                             self.end_id)
        return True

    def cuda(self, device=None) -> "ParallelGPT":
        """The device is chosen at construction (each rank's local GPU, else the CPU)."""
        return self

    def sparse(self) -> "ParallelGPT":
        return self

    @torch.inference_mode()
    def forward(self, start_ids: torch.Tensor, start_lengths: torch.Tensor, output_len: int, beam_width: int = 1,
                top_k=None, top_p=None, beam_search_diversity_rate=None, temperature=None, len_penalty=None,
                repetition_penalty=None, presence_penalty=None, min_length=None, random_seed=None,
                bad_words_list=None, return_output_length: bool = False, return_cum_log_probs: int = 0):
        """FT's ParallelGPT.forward: see the module docstring for the outputs."""
        if self.generator is None:
            raise RuntimeError("call load(ckpt_path) before forward")
        batch, width = self._agreed_batch(start_ids, start_lengths, output_len, beam_width, bad_words_list,
                                          top_k=top_k, top_p=top_p, temperature=temperature,
                                          beam_search_diversity_rate=beam_search_diversity_rate,
                                          len_penalty=len_penalty, repetition_penalty=repetition_penalty,
                                          presence_penalty=presence_penalty, min_length=min_length,
                                          random_seed=random_seed, return_cum_log_probs=return_cum_log_probs)
        out = with_beam_axis(self.generator.generate(batch))
        ids = np.repeat(batch.end_id[:, None, None], out.output_ids.shape[1], axis=1).repeat(width, axis=2)
        n = min(width, out.output_ids.shape[2])
        ids[:, :, :n] = out.output_ids[:, :, :n]
        output_ids = torch.from_numpy(ids.astype(np.int32)).to(self.device)
        lengths = torch.from_numpy(out.sequence_lengths.astype(np.int32)).to(self.device)
        if not return_output_length:
            return output_ids
        if return_cum_log_probs <= 0:
            return output_ids, lengths
        cum = out.cum_log_probs.astype(np.float32)
        if return_cum_log_probs == 2:  # the whole sequence: add the prompt's own log-probs
            cum = cum + self._prompt_log_probs(batch)[:, None]
        return output_ids, lengths, torch.from_numpy(cum).to(self.device)

    def _agreed_batch(self, start_ids, start_lengths, output_len, beam_width, bad_words_list, **args):
        """Check the arguments on every rank (one error, raised everywhere), then run rank 0's."""
        try:
            batch, width, error = *self._batch(start_ids, start_lengths, output_len, beam_width, bad_words_list,
                                               **args), None
        except (RequestError, ValueError) as exc:
            batch, width, error = None, 0, str(exc)
        errors = self.runtime.comm.allgather(error)
        first = next((e for e in errors if e), None)
        if first:
            raise ValueError(first)
        width = self.runtime.comm.bcast(width, root=0)
        if self.world_size > 1:
            if self.rank == 0:
                self.channel.send_generate(batch)
            else:
                batch = self.channel.receive()[1]
        return batch, width

    def _batch(self, start_ids, start_lengths, output_len, beam_width, bad_words_list, return_cum_log_probs,
               **args) -> tuple[Batch, int]:
        ids = _numpy(start_ids).astype(np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"start_ids must be [batch, seq_len] with seq_len > 0 (got shape {list(ids.shape)}); "
                             "for unconditional generation pass start_id as the only token")
        rows = ids.shape[0]
        lengths = _numpy(start_lengths).astype(np.int64).reshape(-1)
        if lengths.shape != (rows,) or (lengths < 1).any() or (lengths > ids.shape[1]).any():
            raise ValueError(f"start_lengths must hold {rows} lengths in [1, {ids.shape[1]}] (got {lengths.tolist()})")
        if return_cum_log_probs not in (0, 1, 2):
            raise ValueError(f"return_cum_log_probs must be 0, 1 or 2 (got {return_cum_log_probs})")
        given = {_ARGS[name]: _per_row(value, rows, name) for name, value in args.items() if value is not None}
        given["beam_width"] = np.full(rows, int(beam_width))
        params = check_params(given, rows, self.limits)
        params["start_id"][:] = self.start_id
        params["end_id"][:] = self.end_id
        prompts = [row[:n].tolist() for row, n in zip(ids, lengths)]
        checked = check_rows(prompts, [int(output_len)] * rows, params, self.limits, "start_ids",
                             bad_words=_bad_words(bad_words_list, rows, self.limits))
        return make_batch([checked]), ids.shape[1] + int(output_len)

    def _prompt_log_probs(self, batch: Batch) -> np.ndarray:
        """(B,): sum of log p(token | the tokens before it) over each prompt (all ranks take part)."""
        logits = torch.from_numpy(self.generator.prompt_logits(batch))
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, torch.from_numpy(batch.input_ids[:, 1:, None]))
        valid = torch.arange(1, batch.input_ids.shape[1])[None, :] < torch.from_numpy(batch.lengths)[:, None]
        return (logp[..., 0] * valid).sum(dim=1).numpy().astype(np.float32)


GPT = ParallelGPT  # FT's single-GPU class has the same interface


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


def _per_row(value, rows: int, name: str) -> np.ndarray:
    """A scalar, [1] or [rows] argument -> (rows,), as FT's op takes them."""
    array = _numpy(value).reshape(-1)
    if array.size not in (1, rows):
        raise ValueError(f"{name} must be a scalar or hold 1 or {rows} values (got {array.size})")
    return np.broadcast_to(array, (rows,))


def _bad_words(value, rows: int, limits: Limits) -> list:
    """FT's bad_words_list, [2, L] (every row) or [B, 2, L] -> per row a list of words."""
    from ft_runner.serving.validation import ft_word_lists

    if value is None:
        return [[] for _ in range(rows)]
    array = _numpy(value)
    if array.ndim == 2:
        array = np.broadcast_to(array, (rows, *array.shape))
    return ft_word_lists({"bad_words_list": array}, "bad_words_list", rows, limits)
