"""The "before" of the before/after benchmark: plain HF transformers behind the same OpenAI
completions endpoint shape, one request at a time, as a hand-built server would do it.

    python benchmarks/hf_openai_server.py --model DIR --port 9100 [--device cuda --dtype fp16]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid

import torch
import transformers
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel


class Completion(BaseModel):
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    stream: bool = False
    ignore_eos: bool = False
    model: str | None = None


def build_app(model_dir: str, device: str, dtype: str) -> FastAPI:
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    lock = threading.Lock()  # one generate at a time
    app = FastAPI()

    def run(body: Completion, streamer=None):
        ids = tokenizer(body.prompt, return_tensors="pt")["input_ids"].to(device)
        kwargs = dict(max_new_tokens=body.max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                      streamer=streamer)
        if body.ignore_eos:
            kwargs["min_new_tokens"] = body.max_tokens
        with lock, torch.inference_mode():
            out = model.generate(ids, **kwargs)
        return ids.shape[1], out[0, ids.shape[1]:].tolist()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: Completion):
        if not body.stream:
            n_prompt, new = run(body)
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "choices": [{"index": 0, "text": tokenizer.decode(new, skip_special_tokens=True),
                                 "finish_reason": "length" if len(new) >= body.max_tokens else "stop"}],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(new),
                              "total_tokens": n_prompt + len(new)}}
        streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        threading.Thread(target=run, args=(body, streamer), daemon=True).start()

        def events():
            for text in streamer:
                if text:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': text, 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp16" if torch.cuda.is_available() else "fp32")
    args = p.parse_args()
    uvicorn.run(build_app(args.model, args.device, args.dtype), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
