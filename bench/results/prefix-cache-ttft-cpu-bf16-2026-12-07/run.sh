# The three passes of this folder, in this order (2026-12-07, 21:36-21:45 UTC), from the repository root.
set -x
D=bench/results/prefix-cache-ttft-cpu-bf16-2026-12-07
COMMON="--policies llm,rstitch:0.05 --concurrency 1 --synthetic 16 --problem-seed 700 --max-tokens 16 --system-prompt-words 600 --dtype bfloat16 --threads 2 --no-offline"
rstitch bench serve $COMMON --out $D/on
rstitch bench serve $COMMON --no-prefix-caching --out $D/off
rstitch bench serve $COMMON --out $D/on-again
# then: python $D/equality_check.py bfloat16 16 > $D/equality-bf16.jsonl; ... float32 6 > $D/equality-fp32.jsonl
