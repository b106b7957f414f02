"""Run under mpirun by test_parallel_gpt.py: a script written the way FT's multi_gpu_gpt_example.py
is, against ft_runner.parallel_gpt.ParallelGPT, checked against HF transformers on rank 0.

Prints `CHECK <name> ok|FAIL ...` lines on rank 0 and exits non-zero on any failure.
"""

import argparse
import configparser
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.nn.utils.rnn import pad_sequence

from ft_runner.checkpoint.convert import convert
from ft_runner.parallel_gpt import ParallelGPT

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "a"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=2)
    args = p.parse_args()
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        convert(Path(args.model), Path(args.out), args.tp)
    MPI.COMM_WORLD.Barrier()
    ckpt_path = Path(args.out) / f"{args.tp}-gpu"

    # as in FT's example: the model's shape from config.ini, then ParallelGPT(...), load, forward
    cfg = configparser.ConfigParser()
    cfg.read(ckpt_path / "config.ini")
    head_num, size_per_head = cfg.getint("gpt", "head_num"), cfg.getint("gpt", "size_per_head")
    vocab_size, layer_num = cfg.getint("gpt", "vocab_size"), cfg.getint("gpt", "num_layer")
    start_id, end_id = cfg.getint("gpt", "start_id"), cfg.getint("gpt", "end_id")
    gpt = ParallelGPT(head_num, size_per_head, vocab_size, start_id, end_id, layer_num,
                      cfg.getint("gpt", "max_pos_seq_len"), args.tp, 1, lib_path="unused.so",
                      inference_data_type="fp32", inter_size=cfg.getint("gpt", "inter_size"))
    assert gpt.load(ckpt_path=str(ckpt_path))
    assert not gpt.load(ckpt_path="/nonexistent")

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    contexts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    start_ids = pad_sequence([torch.tensor(c, dtype=torch.int32) for c in contexts], batch_first=True,
                             padding_value=end_id)
    start_lengths = torch.tensor([len(c) for c in contexts], dtype=torch.int32)
    B, S, new = len(contexts), start_ids.shape[1], 10
    ones = torch.ones(B, dtype=torch.int32)

    greedy = gpt(start_ids, start_lengths, new, 1, top_k=1 * ones, top_p=0.0 * ones.float(),
                 temperature=1.0 * ones.float(), repetition_penalty=1.0 * ones.float(),
                 random_seed=torch.zeros(B, dtype=torch.int64), return_output_length=True, return_cum_log_probs=1)
    beams = gpt(start_ids, start_lengths, new, 3, len_penalty=1.0, return_output_length=True, return_cum_log_probs=1)
    bad = torch.tensor([[int(greedy[0][0, 0, len(contexts[0])]), 0], [1, -1]], dtype=torch.int32)  # [2, L]
    banned = gpt(start_ids, start_lengths, new, bad_words_list=bad, return_output_length=True)
    whole = gpt(start_ids, start_lengths, new, return_output_length=True, return_cum_log_probs=2)
    only_ids = gpt(start_ids, start_lengths, new)
    sampled = gpt(start_ids, start_lengths, new, top_k=5, temperature=0.8, random_seed=7,
                  return_output_length=True)
    alone = gpt(start_ids[1:2], start_lengths[1:2], new, top_k=5, temperature=0.8, random_seed=7,
                return_output_length=True)
    errors = []
    for kwargs in (dict(repetition_penalty=1.2, presence_penalty=0.5), dict(top_p=1.5), dict(beam_width=64),
                   dict(temperature=-1.0)):
        try:
            gpt(start_ids, start_lengths, new, **{"beam_width": 1, **kwargs})
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    if gpt.rank != 0:
        return 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    results = {}

    def run(prompt, **kw):
        return hf.generate(torch.tensor([prompt]), max_new_tokens=new, pad_token_id=end_id, **kw)

    ids, lengths, cum = greedy
    results["shapes"] = (ids.shape == (B, 1, S + new) and ids.dtype == torch.int32 and lengths.shape == (B, 1)
                         and cum.shape == (B, 1) and only_ids.shape == ids.shape)
    results["greedy"] = all(ids[b, 0, : lengths[b, 0]].tolist() == run(c, do_sample=False)[0].tolist()
                            for b, c in enumerate(contexts))
    ok = True
    for b, c in enumerate(contexts):
        h = run(c, num_beams=3, num_return_sequences=3, do_sample=False, length_penalty=1.0,
                return_dict_in_generate=True, output_scores=True)
        ids_b, len_b, cum_b = beams[0][b], beams[1][b], beams[2][b]
        for w in range(3):
            ours = ids_b[w, : len_b[w]].tolist()
            ok &= ours == h.sequences[w, : len(ours)].tolist()
            ok &= abs(float(cum_b[w]) / (len_b[w] - len(c)).item() - h.sequences_scores[w].item()) < 1e-4
    results["beams"] = ok
    results["bad_words"] = all(
        banned[0][b, 0, : banned[1][b, 0]].tolist() == run(c, do_sample=False, bad_words_ids=[[int(bad[0, 0])]])[0].tolist()
        for b, c in enumerate(contexts))
    prompt_lp = []
    for c in contexts:
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([c])).logits[0], dim=-1)
        prompt_lp.append(sum(float(logp[t - 1, c[t]]) for t in range(1, len(c))))
    results["cum_log_probs_2"] = np.allclose(whole[2][:, 0].numpy() - greedy[2][:, 0].numpy(), prompt_lp, atol=1e-3)
    results["seed"] = sampled[0][1, 0, : sampled[1][1, 0]].tolist() == alone[0][0, 0, : alone[1][0, 0]].tolist()
    results["errors"] = (all(errors) and "mutually exclusive" in errors[0] and "runtime_top_p[0] = 1.5" in errors[1]
                         and "beam_width[0] = 64" in errors[2] and "temperature[0] = -1" in errors[3])
    for name, good in results.items():
        print(f"CHECK {name} {'ok' if good else 'FAIL'}", flush=True)
    if not results["errors"]:
        print(errors, flush=True)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
