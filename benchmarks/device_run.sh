#!/usr/bin/env bash
# Everything a GPU session runs, step by step; logs go to $OUT, a short summary to stdout.
#   bash benchmarks/device_run.sh STEP [STEP ...]
# Steps:
#   kernels     GPU facts, kernel self-check (ft_runner/kernels/selfcheck.py)
#   micro       GEMV/attention/sampling micro-benchmarks (benchmarks/microbench.py)
#   tune        the few-row GEMM and decode attention against their config grids (microbench --sweep)
#   micro-rows  the few-row GEMM against cuBLAS and decode attention, default configs (microbench)
#   parity1     parity with HF, TP=1, fp16 (benchmarks/gpu_checks.py)
#   dev         ft_runner-only bench of gpt2-medium and GPT-J (bs 1/32/64) with per-kernel profiles
#   dev-small   as dev, gpt2-medium only
#   dev-gptj    ft_runner-only bench of GPT-J (bs 1/32/64)
#   checks1     parity with HF, TP=1, fp32 and fp16 (benchmarks/gpu_checks.py)
#   bench-small the BENCHMARKS.md rows for gpt2 and gpt2-medium (all engines)
#   bench-large the BENCHMARKS.md rows for GPT-J-6B (all engines)
#   bench-llama the BENCHMARKS.md rows for Llama-3-8B
#   bench-bf16  the BENCHMARKS.md bf16 rows for GPT-J-6B and Llama-3-8B (all engines)
#   before-after (needs the PyTriton wheelhouse and .whl/3, the OpenAI API's wheels) the REST
#               before/after of issue #9 on a random GPT-J-6B (benchmarks/before_after.py)
#   tp2-parity  (two GPUs) parity TP=2 fp32+fp16 and TP=1 fp32
#   tp2-bench   (two GPUs) GPT-J bs1 decode, TP=2 then TP=1 (one conversion); run it before the
#               wheelhouse's part 2 (numpy 1.26.4) is installed
#   tp2-e2e     (two GPUs) end-to-end server TP=2 (needs both wheelhouse parts installed)
#   inflight    the in-flight engine, in two calls: inflight-a the paged kernels' self-check, Llama-3-8B
#               1000 x 128/128, the mixed 512 (three engines, 45 s cap each), 512 x (1024 shared + 128)/128
#               with and without prefix caching, online 20 x 512/128 at 1 req/s; inflight-b GPT-J bs1
#               in-flight vs static and gpu_checks in fp16 (the in-flight engine beside the static one)
#   inflight-c..f  re-measures of those workloads after a change (each one's comment says which)
#   final       what is left, as two back-to-back calls: final-a quant's kernels, GPT-J bs1 fp16 vs int8_wo,
#               Llama 128/128 fp16 vs fp8 + fp8 KV, the mixed 512 (four engines; then at 1024 seqs);
#               final-b 1000/1000, online 1 req/s, the mixed 512 in fp8 (final-c: without the fp8 mixed);
#               final-d: final-a's A/Bs and four-engine mixed 512 only (no self-check, no wide mixed);
#               each capped so that a call ends in time
#   serving     the serving benchmark's GPU workloads on a random Llama-3-8B, fp16, offline
#               (benchmarks/bench_serving.py): serving-a 1000 x 128/128 and serving-b 1000 x 1000/1000
#               (ft_runner), serving-c the mixed 512 x 64:512/16:512 at t=0 (ft_runner, ft_runner-static,
#               hf-cb), serving-d 60 x 512/128 at 1 req/s (ft_runner). All four may pass 10 minutes:
#               the sub-steps run one each (serving-c: about 5 minutes at most)
#   quant       issue #19 (quantized serving), one GPU, about 6 minutes on an H100: the int8 / fp8 kernels'
#               self-check; GPT-J-6B random-weight logits' cosine to fp16 (benchmarks/quant_checks.py, >= 0.99);
#               GPT-J-6B bs1 decode fp16 vs int8_wo (bench_serving, ft_runner, --max-concurrency 1); Llama-3-8B
#               1000 x 128/128 offline fp16 vs fp8 weights + fp8 KV cache
# Two-GPU session, two back-to-back calls (each carries one wheelhouse part):
#   python3 -m pip install -q --no-index --no-deps .whl/1/*.whl; bash benchmarks/device_run.sh tp2-bench tp2-parity
#   python3 -m pip install -q --no-index --no-deps .whl/2/*.whl; bash benchmarks/device_run.sh tp2-e2e
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=8
# benchmarks/.commit (git-ignored: `git rev-parse --short HEAD > benchmarks/.commit`, pass it in `carry`) names the commit
export FT_RUNNER_COMMIT=${FT_RUNNER_COMMIT:-$(cat benchmarks/.commit 2>/dev/null || echo unknown)}
MPI="mpirun --allow-run-as-root --bind-to none -x PYTHONPATH -x PYTHONUNBUFFERED -x FT_RUNNER_COMMIT -x HF_HUB_OFFLINE"
BENCH="python3 benchmarks/bench_generate.py --results $OUT/results"

step() { echo "=== $1 ($(date -u +%H:%M:%S))"; }
# The wheelhouse's numpy 1.26.4 (PyTriton 0.7 answers empty under numpy 2) lacks the np.long / np.ulong
# aliases the host's transformers 5.17 imports: steps that serve put them back for their processes only.
shim_numpy() {
  mkdir -p /tmp/npshim
  printf 'import numpy\nfor _n, _t in (("long", "int_"), ("ulong", "uint")):\n    if not hasattr(numpy, _n):\n        setattr(numpy, _n, getattr(numpy, _t))\n' > /tmp/npshim/sitecustomize.py
}

# The serving benchmark's calls (benchmarks/bench_serving.py). Each step that serves sets SERVE (the
# command and the flags all its calls share) and summary() (which lines of a log it prints).
# vLLM's offline defaults for an H100: 1024 sequences, 16384 tokens a step
WIDE=(--max-num-seqs 1024 --max-num-batched-tokens 16384)
# serve TIMEOUT LOG ARGS...: one "${SERVE[@]}" ARGS call, killed after TIMEOUT seconds (0: never),
# its output in $OUT/LOG.log, then summary of that log
serve() {
  if [ "$1" = 0 ]; then "${SERVE[@]}" "${@:3}" > "$OUT/$2.log" 2>&1
  else timeout "$1" "${SERVE[@]}" "${@:3}" > "$OUT/$2.log" 2>&1; fi
  summary "$OUT/$2.log"
}
# gptj_bs1 TIMEOUT LOG ARGS...: GPT-J-6B bs1 decode, 4 x 128/256 one at a time; ARGS (engines,
# quantization) go right after --model
gptj_bs1() {
  serve "$1" "$2" --model gptj-6b "${@:3}" --num-prompts 4 --max-concurrency 1 --input-len 128 --output-len 256 \
    --workload-name bs1-128-256
}
# llama128 TIMEOUT LOG "FLAGS" [EXTRA...]: Llama-3-8B 1000 x 128/128; FLAGS (engines, quantization; one
# word-split string) go right after --model, EXTRA after --output-len
llama128() {
  # shellcheck disable=SC2086  # FLAGS is a list of flags
  serve "$1" "$2" --model llama-3-8b $3 --num-prompts 1000 --input-len 128 --output-len 128 "${@:4}" \
    --workload-name random-1000x128-128
}
# mixed512 TIMEOUT LOG ENGINES [EXTRA...]: Llama-3-8B, 512 x 64:512/16:512 all at t=0
mixed512() {
  serve "$1" "$2" --model llama-3-8b --engines "$3" --num-prompts 512 --input-len 64:512 --output-len 16:512 \
    "${@:4}" --workload-name mixed-512
}
# llama1000 TIMEOUT [EXTRA...]: Llama-3-8B 1000 x 1000/1000 (ft_runner), to serving_b.log
llama1000() {
  serve "$1" serving_b --model llama-3-8b --engines ft_runner --num-prompts 1000 --input-len 1000 --output-len 1000 \
    "${@:2}" --workload-name random-1000x1000-1000
}
# online NUM_PROMPTS: Llama-3-8B NUM_PROMPTS x 512/128 at 1 request/s (ft_runner), to serving_d.log
online() {
  serve 0 serving_d --model llama-3-8b --engines ft_runner --num-prompts "$1" --input-len 512 --output-len 128 \
    --request-rate 1 --workload-name online-1rps-512-128
}
# chat: Llama-3-8B, 16 turns of one chat (256 in, 64 out each), with and without prefix caching
chat() {
  serve 0 serving_chat --model llama-3-8b --engines ft_runner,ft_runner-no-prefix-cache --num-prompts 16 --chat \
    --input-len 256 --output-len 64 --max-concurrency 1 --workload-name chat-16x256-64
}
# shared_prefix: Llama-3-8B, 512 x (1024 shared + 128)/128 with and without prefix caching, 45 s cap
shared_prefix() {
  serve 0 serving_prefix --model llama-3-8b --engines ft_runner,ft_runner-no-prefix-cache --num-prompts 512 \
    --shared-prefix-len 1024 --input-len 128 --output-len 128 --max-duration-s 45 --workload-name shared-1024+128-128
}

for s in "$@"; do
  case $s in
  kernels)
    step kernels
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    python3 -m ft_runner.kernels.selfcheck > "$OUT/selfcheck.log" 2>&1; grep -E "FAIL|SELFCHECK|Error" "$OUT/selfcheck.log" | tail -5
    ;;
  micro)
    step micro
    python3 benchmarks/microbench.py --sweep 2>&1 | tee "$OUT/microbench.log" | grep -v "^\[" | tail -40
    ;;
  tune)
    step tune
    python3 benchmarks/microbench.py --sweep --parts skinny,attention 2>&1 | tee "$OUT/microbench_tune.log" | grep -v "^\[" | tail -60
    ;;
  micro-rows)
    step micro-rows
    python3 benchmarks/microbench.py --parts skinny,attention 2>&1 | tee "$OUT/microbench_rows.log" | grep -v "^\[" | tail -60
    ;;
  parity1)
    step parity1
    python3 benchmarks/gpu_checks.py --tp 1 --dtypes fp16 --skip-kernels > "$OUT/gpu_checks_tp1.log" 2>&1
    grep -E "GPUCHECK|Error" "$OUT/gpu_checks_tp1.log" | tail -8
    ;;
  dev)
    step dev
    $BENCH --models gpt2-medium,gptj-6b --batch 1,32,64 --engines ft_runner --profile > "$OUT/bench_dev.log" 2>&1
    grep -E "PROFILE|^model|^---|ft_runner |Error|error" "$OUT/bench_dev.log" | tail -80
    ;;
  dev-small)
    step dev-small
    $BENCH --models gpt2-medium --batch 1,32,64 --engines ft_runner --profile > "$OUT/bench_dev_small.log" 2>&1
    grep -E "PROFILE|ft_runner |Error|error" "$OUT/bench_dev_small.log" | tail -60
    ;;
  dev-gptj)
    step dev-gptj
    $BENCH --models gptj-6b --batch 1,32,64 --engines ft_runner > "$OUT/bench_dev_gptj.log" 2>&1
    grep -E "ft_runner |Error|error" "$OUT/bench_dev_gptj.log" | tail -6
    ;;
  checks1)
    step checks1
    python3 benchmarks/gpu_checks.py --tp 1 --dtypes fp32,fp16 --skip-kernels > "$OUT/gpu_checks_tp1.log" 2>&1
    grep -E "GPUCHECK|Error" "$OUT/gpu_checks_tp1.log" | tail -20
    ;;
  bench-small)
    step bench-small
    $BENCH --models gpt2 --batch 1 --profile > "$OUT/bench_small.log" 2>&1
    $BENCH --models gpt2-medium --batch 1,32,64 --profile >> "$OUT/bench_small.log" 2>&1
    grep -E "^model|^---|  fp16 |Error|error" "$OUT/bench_small.log" | tail -30
    ;;
  bench-large)
    step bench-large
    $BENCH --models gptj-6b --batch 1,32,64 --profile > "$OUT/bench_large.log" 2>&1
    grep -E "^model|^---|  fp16 |Error|error" "$OUT/bench_large.log" | tail -30
    ;;
  bench-llama)
    step bench-llama
    $BENCH --models llama-3-8b --batch 1,32,64 > "$OUT/bench_llama.log" 2>&1
    grep -E "^model|^---|  fp16 |Error|error" "$OUT/bench_llama.log" | tail -30
    ;;
  bench-bf16)
    step bench-bf16
    $BENCH --models gptj-6b,llama-3-8b --dtype bf16 --batch 1,32,64 > "$OUT/bench_bf16.log" 2>&1
    grep -E "^model|^---|  bf16 |Error|error" "$OUT/bench_bf16.log" | tail -30
    ;;
  before-after)
    step before-after
    shim_numpy
    PYTHONPATH=$PWD:/tmp/npshim python3 benchmarks/random_model.py --shape gptj-6b --out /tmp/gptj-random \
      > "$OUT/random_model.log" 2>&1
    grep -E "saved|Error" "$OUT/random_model.log" | tail -3
    # before_after.py writes the servers' logs to $OUT/before_after.log, its table to stdout
    PYTHONPATH=$PWD:/tmp/npshim python3 benchmarks/before_after.py --model /tmp/gptj-random \
      --concurrency 1 4 16 --requests 16 --max-tokens 64 --out "$OUT/before_after" > "$OUT/before_after.out" 2>&1
    grep -A8 -E "^engine" "$OUT/before_after.out"; grep -E "Error|error" "$OUT/before_after.out" | tail -5
    ;;
  tp2-parity)
    step tp2-parity
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
    $MPI -n 2 python3 benchmarks/gpu_checks.py --tp 2 --dtypes fp32,fp16 > "$OUT/gpu_checks_tp2.log" 2>&1
    grep -E "GPUCHECK|SELFCHECK|Error" "$OUT/gpu_checks_tp2.log" | tail -14
    python3 benchmarks/gpu_checks.py --tp 1 --dtypes fp32 --skip-kernels > "$OUT/gpu_checks_tp1_fp32.log" 2>&1
    grep -E "GPUCHECK|Error" "$OUT/gpu_checks_tp1_fp32.log" | tail -8
    ;;
  tp2-e2e)
    step tp2-e2e
    shim_numpy
    PYTHONPATH=$PWD:/tmp/npshim python3 benchmarks/gpu_e2e.py --tp 2 > "$OUT/e2e_tp2.log" 2>&1
    grep -E "E2E|Error" "$OUT/e2e_tp2.log" | tail -10
    ;;
  tp2-bench)
    step tp2-bench
    $MPI -n 2 $BENCH --tp 2 --models gptj-6b --batch 1 --engines ft_runner > "$OUT/bench_tp.log" 2>&1
    $BENCH --tp 1 --ckpt-tp 2 --models gptj-6b --batch 1 --engines ft_runner >> "$OUT/bench_tp.log" 2>&1
    grep -E "^model|^---|  fp16 |Error|error|Warning: CUDA" "$OUT/bench_tp.log" | tail -12
    ;;
  inflight|inflight-a|inflight-b|inflight-c|inflight-d|inflight-e|inflight-f)
    # the in-flight engine on one GPU: inflight-a the paged kernels' self-check and issue #17/#20's
    # workloads (shortened), inflight-b the GPT-J bs1 A/B and gpu_checks in fp16; inflight both
    SERVE=(python3 benchmarks/bench_serving.py --offline --dtype fp16 --results "$OUT/results")
    summary() { grep -E "^Engine|^Output token|^Median (TTFT|TPOT|ITL)|skipping|truncated|Error|error" "$1" | tail -24; }
    case $s in inflight|inflight-a)
      step inflight-kernels
      nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
      python3 -m ft_runner.kernels.selfcheck --only "paged attention torch.float16,prefill torch.float16" \
        > "$OUT/selfcheck.log" 2>&1; grep -E "FAIL|SELFCHECK|Error" "$OUT/selfcheck.log" | tail -5
      step inflight-128
      llama128 0 serving_a "--engines ft_runner"
      step inflight-mixed
      mixed512 0 serving_c ft_runner,ft_runner-static,hf-cb --max-duration-s 45
      step inflight-prefix
      shared_prefix
      step inflight-online
      online 20 ;; esac
    case $s in inflight-d)  # the short re-measure: GPT-J bs1 A/B, online, the 16-turn chat, the mixed 512
      step inflight-gptj-bs1
      gptj_bs1 0 serving_gptj --engines ft_runner,ft_runner-static
      step inflight-online
      online 16
      chat
      step inflight-mixed
      mixed512 0 serving_c ft_runner,ft_runner-static ;; esac
    case $s in inflight-e)  # the re-measure at 95ace68: bs1 A/B, online, chat and mixed with/without the cache, wide batches
      step inflight-gptj-bs1
      gptj_bs1 0 serving_gptj --engines ft_runner,ft_runner-static
      step inflight-online
      online 16
      step inflight-chat
      chat
      step inflight-mixed
      mixed512 0 serving_c ft_runner,ft_runner-no-prefix-cache,ft_runner-static
      step inflight-128-wide
      llama128 0 serving_a1024 "--engines ft_runner" "${WIDE[@]}" ;; esac
    case $s in inflight-f)  # after the aligned prefill tables: the mixed 512 (cache, no cache, static), 128/128
      # and 1000/1000 at vLLM's offline defaults for an H100 (1024 sequences, 16384 tokens a step)
      step inflight-mixed
      mixed512 0 serving_c ft_runner,ft_runner-no-prefix-cache,ft_runner-static
      step inflight-128-wide
      llama128 0 serving_a1024 "--engines ft_runner" "${WIDE[@]}"
      step inflight-1000
      llama1000 0 "${WIDE[@]}" ;; esac
    case $s in inflight-c)  # the re-measure after a change: GPT-J bs1 A/B, Llama 128/128, the mixed 512, online
      step inflight-gptj-bs1
      gptj_bs1 0 serving_gptj --engines ft_runner,ft_runner-static
      step inflight-128
      llama128 0 serving_a "--engines ft_runner"
      llama128 0 serving_a512 "--engines ft_runner" --max-num-seqs 512
      step inflight-mixed
      mixed512 0 serving_c ft_runner,ft_runner-no-prefix-cache,ft_runner-static
      step inflight-online
      online 20
      step inflight-prefix
      shared_prefix
      chat ;; esac
    case $s in inflight|inflight-b)
      step inflight-gptj-bs1
      gptj_bs1 0 serving_gptj --engines ft_runner,ft_runner-static
      step inflight-gpu-checks
      python3 benchmarks/gpu_checks.py --tp 1 --dtypes fp16 --skip-kernels --only gptj,llama,qwen2 \
        > "$OUT/gpu_checks.log" 2>&1; grep -E "GPUCHECK|Error" "$OUT/gpu_checks.log" | cut -c1-220 ;; esac
    ;;
  quant)
    SERVE=(python3 benchmarks/bench_serving.py --offline --dtype fp16 --engines ft_runner --results "$OUT/results")
    summary() { grep -E "^Engine|^Output token|^Median (TTFT|TPOT|ITL)|skipping|truncated|Error|error" "$1" | tail -12; }
    step quant-kernels
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -m ft_runner.kernels.selfcheck --only int8,fp8 > "$OUT/selfcheck_quant.log" 2>&1
    grep -E "FAIL|SELFCHECK|Error" "$OUT/selfcheck_quant.log" | cut -c1-200 | tail -12
    step quant-accuracy
    python3 benchmarks/quant_checks.py --model gptj-6b > "$OUT/quant_checks.log" 2>&1
    grep -E "QUANTCHECK|Error" "$OUT/quant_checks.log" | tail -4
    step quant-gptj-bs1
    for q in none int8_wo; do
      echo "-- $q"; gptj_bs1 0 "quant_gptj_$q" --quantization "$q"
    done
    step quant-llama-128
    for qk in none:auto fp8:fp8; do
      echo "-- $qk"; llama128 0 "quant_llama_${qk%:*}" "--quantization ${qk%:*} --kv-cache-dtype ${qk#*:}"
    done
    ;;
  final|final-a|final-b|final-c|final-d)
    # what is left, in two back-to-back calls of under 10 minutes each (final-a, then final-b at once,
    # while the machine is warm): issue #19's kernels and speed A/Bs, issue #17/#20's mixed 512 after
    # 73374a8's aligned prefill tables (four engines, one run) and at vLLM's offline H100 defaults,
    # then 1000/1000, the online rate and the mixed 512 in fp8. Every in-flight row carries its step
    # profile (bench_serving's StepProfile: time by kind of step).
    SERVE=(python3 benchmarks/bench_serving.py --offline --dtype fp16 --results "$OUT/results")
    summary() { grep -E "^Engine|^Output token|^Median (TTFT|TPOT|ITL)|^Steps|truncated|Error|error" "$1" | tail -24; }
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    case $s in final|final-a)
      step quant-kernels
      timeout 150 python3 -m ft_runner.kernels.selfcheck --only int8,fp8 > "$OUT/selfcheck_quant.log" 2>&1
      grep -E "FAIL|SELFCHECK|Error" "$OUT/selfcheck_quant.log" | cut -c1-200 | tail -8 ;; esac
    case $s in final|final-a|final-d)
      step quant-gptj-bs1
      for q in none int8_wo; do
        echo "-- $q"; gptj_bs1 90 "quant_gptj_$q" --engines ft_runner --quantization "$q"
      done
      step quant-llama-128
      for qk in none:auto fp8:fp8; do
        echo "-- $qk"
        llama128 100 "quant_llama_${qk%:*}" "--engines ft_runner --quantization ${qk%:*} --kv-cache-dtype ${qk#*:}" "${WIDE[@]}"
      done
      step inflight-mixed
      mixed512 200 serving_c ft_runner,ft_runner-no-prefix-cache,ft_runner-static,hf-cb --max-duration-s 40 ;; esac
    case $s in final|final-a)
      step inflight-mixed-wide
      mixed512 90 serving_c_wide ft_runner,ft_runner-no-prefix-cache "${WIDE[@]}" ;; esac
    case $s in final|final-b|final-c)
      step inflight-1000
      llama1000 330 "${WIDE[@]}" --max-duration-s 280
      step inflight-online
      online 16 ;; esac
    case $s in final|final-b)
      step quant-mixed-fp8
      mixed512 90 serving_c_fp8 ft_runner --quantization fp8 --kv-cache-dtype fp8 "${WIDE[@]}" ;; esac
    ;;
  serving|serving-a|serving-b|serving-c|serving-d)
    step "$s"
    SERVE=(python3 benchmarks/bench_serving.py --offline --model llama-3-8b --dtype fp16 --results "$OUT/results")
    summary() { grep -E "^Engine|^Request rate|^Successful|^Benchmark duration|^Output token|^Median (TTFT|TPOT)|skipping|truncated|Error|error" "$1" | tail -40; }
    case $s in serving|serving-a)
      serve 0 serving_a --engines ft_runner --num-prompts 1000 --input-len 128 --output-len 128 \
        --workload-name random-1000x128-128 ;; esac
    case $s in serving|serving-b)
      serve 0 serving_b --engines ft_runner --num-prompts 1000 --input-len 1000 --output-len 1000 --max-duration-s 180 \
        --workload-name random-1000x1000-1000 ;; esac
    case $s in serving|serving-c)
      serve 0 serving_c --engines ft_runner,ft_runner-static,hf-cb --num-prompts 512 --input-len 64:512 --output-len 16:512 \
        --request-rate inf --max-duration-s 150 --workload-name mixed-512 --plot "$OUT/serving_mixed.png" ;; esac
    case $s in serving|serving-d)
      serve 0 serving_d --engines ft_runner --num-prompts 60 --input-len 512 --output-len 128 --request-rate 1 \
        --workload-name online-1rps-512-128 ;; esac
    ;;
  *) echo "unknown step $s" ;;
  esac
done
cat "$OUT"/results/*.jsonl > "$OUT/results.jsonl" 2>/dev/null
step done
