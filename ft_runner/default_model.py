"""Build the embedded default model: a tiny GPT-2 trained on CPython's own documentation.

`python -m ft_runner.default_model --out DIR [--seconds 360]` trains it from scratch, offline, on
2 CPU cores for --seconds (default 360, about 6 minutes): a byte-level BPE tokenizer (1024 tokens)
and a 4-layer, 128-wide GPT-2 (1.1M parameters, context 256) trained on the text of
`pydoc_data.topics`, with CHAT_TEMPLATE, a plain "role: content" chat template, so that
/v1/chat/completions works on it. The repository ships the result in ft_runner/assets/tiny-gpt2 so
the server needs no network.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

EOS = "<|endoftext|>"
# One "role: content" line per message, then "assistant:" for the reply: the simplest template that
# a model trained on plain text can continue.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items())]


def build_tokenizer(texts, out: Path, vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                        unk_token=EOS, pad_token=EOS, model_max_length=256)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def train(out: Path, seconds: float, seed: int = 0) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    texts = corpus()
    tokenizer = build_tokenizer(texts, out, vocab_size=1024)
    ids = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=4, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    start, step, block, batch = time.time(), 0, 128, 16
    while time.time() - start < seconds:
        rows = torch.randint(0, len(data) - block - 1, (batch,))
        x = torch.stack([data[r:r + block] for r in rows])
        loss = model(input_ids=x, labels=x).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.save_pretrained(out)
    print(f"saved {out} after {step} steps, loss {loss.item():.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=360.0)
    args = parser.parse_args(argv)
    train(args.out, args.seconds)


if __name__ == "__main__":
    main()
