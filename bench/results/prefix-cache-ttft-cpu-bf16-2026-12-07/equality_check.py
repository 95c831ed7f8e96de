"""Are outputs equal with and without prefix caching on the demo pair? (the TTFT workload's prompts)"""
import json, sys, time
from rstitch_engine import Engine, SamplingParams, policies
from rstitch_engine.cli_args import chosen_problems
from rstitch_engine.evaluation import build_messages
from rstitch_engine.evaluation import synthetic_problems
from rstitch_engine.serving.bench_serve import shared_system_prompt
import torch
torch.set_num_threads(2)
dtype = sys.argv[1]
n = int(sys.argv[2])
probs = synthetic_problems(n, 700, "basic")
convs = [[{"role": "system", "content": shared_system_prompt(600)}] + build_messages(p["question"]) for p in probs]
params = SamplingParams(max_tokens=16, temperature=0.0)
res = {}
for caching in (True, False):
    eng = Engine(slm="demo:slm", llm="demo:llm", dtype=dtype, prefix_caching=caching)
    for pol in (policies.LLMOnly(), policies.RStitch(tau=0.05)):
        outs = []
        for c in convs:  # one at a time, as bench serve at concurrency 1
            outs += eng.chat([c], params, pol, use_tqdm=False)
        res[(caching, pol.name)] = [(o.token_ids, o.sources) for o in outs]
    del eng
for pol in ("llm", "rstitch:0.05"):
    a, b = res[(True, pol)], res[(False, pol)]
    same = sum(x == y for x, y in zip(a, b))
    first = [next((i for i, (s, t) in enumerate(zip(x[0], y[0])) if s != t), None) for x, y in zip(a, b)]
    print(json.dumps({"dtype": dtype, "policy": pol, "identical": same, "of": len(a), "first_token_diff": first}))
