"""The explorer's prompt trajectory against the bare cost of what it must compute (issue 37).

    .venv/bin/python benchmarks/bench_view.py [--config config/config.yaml --model smollm2-135m
        --corpus shakespeare --tokens 32 --rounds 5]

After ``make run`` (the model and the trained lenses of the run must exist). A prompt of
``--tokens`` tokens (the separator included) through what ``POST /api/trajectory``
answers: ``prompt_trajectory`` (one forward, then every lens at every layer: head,
top-1 probability, entropy, KL to the output, next-token rank, top-5) and the JSON of the
answer. The bare arm is the least any such view must do on the same prompt: the forward to
the residual stream and, per lens and layer, the translator and the head (final norm +
unembedding matmul). Rounds alternate the two arms; the median of each is kept. Prints
both times and, last, ``ratio=X`` = explorer / bare (issue 37's bound: < 1.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import load_config
from pipeline.view.catalog import Catalog
from pipeline.view.live import load_run, prompt_trajectory, run_inputs

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the "
    "clouds that lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound"
)


@torch.no_grad()
def bare(run, ids: torch.Tensor) -> None:
    from pipeline.model.residual import residual_stream

    resid, _ = residual_stream(run.model, ids, with_logits=False)  # (L+1, 1, pos, d_model)
    for lens in run.lenses.values():
        for layer in range(resid.shape[0]):
            lens(resid[layer, 0], layer)  # (pos, vocab)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    catalog = Catalog(load_config(args.config))
    model_dir, separator = run_inputs(catalog.artifacts(args.model, args.corpus))
    run = load_run(model_dir, catalog.lens_dirs(args.model, args.corpus), separator)
    from pipeline.analyses.live import text_ids

    ids = text_ids(run.tokenizer, TEXT, separator)[: args.tokens]
    assert len(ids) == args.tokens, f"the text has only {len(ids)} tokens"
    prompt = run.tokenizer.decode(ids[1:] if separator is not None else ids)
    times = {"explorer": [], "bare": []}
    for r in range(args.rounds + 1):  # round 0 warms both up
        t = time.perf_counter()
        answer = prompt_trajectory(run, prompt)
        json.dumps(answer)
        explorer = time.perf_counter() - t
        t = time.perf_counter()
        bare(run, torch.tensor([ids]))
        b = time.perf_counter() - t
        if r:
            times["explorer"].append(explorer)
            times["bare"].append(b)
    n = len(answer["inputs"])
    e, b = statistics.median(times["explorer"]), statistics.median(times["bare"])
    print(f"prompt: {n} tokens, {len(run.lenses)} lenses ({', '.join(run.lenses)}), {len(answer['rows'])} rows")
    print(f"torch threads: {torch.get_num_threads()}; rounds: {args.rounds} (median)")
    print(f"explorer (prompt_trajectory + JSON): {e * 1000:.0f} ms  {[round(x * 1000) for x in times['explorer']]}")
    bare_ms = [round(x * 1000) for x in times["bare"]]
    print(f"bare (forward + translator + head per lens and layer): {b * 1000:.0f} ms  {bare_ms}")
    print(f"ratio={e / b:.2f}")


if __name__ == "__main__":
    main()
