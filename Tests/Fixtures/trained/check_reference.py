#!/usr/bin/env python3
"""Checks smallthinker.py against the SmallThinker authors' reference outputs.

    python3 Tests/Fixtures/trained/check_reference.py

For each random-weight fixture in Tests/Fixtures/smallthinker-tiny and both of its sequences:
the logits of every position, each layer's input and router logits, the final norm's output, and
the chosen experts. Fails (exit 1) if any logit differs by more than 1e-4. This is what makes
smallthinker.py a reference for the trained fixture.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smallthinker  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "smallthinker-tiny")
LIMIT = 1e-4


def main():
    torch.set_num_threads(1)
    worst = 0.0
    for name in ["tiny-4b-like", "tiny-21b-like", "tiny-untied"]:
        directory = os.path.join(ROOT, name)
        model = smallthinker.load(directory)
        with open(os.path.join(directory, "reference.json")) as f:
            reference = json.load(f)
        for sequence, s in sorted(reference["sequences"].items()):
            ids = torch.tensor([s["input_ids"]])
            trace = {}
            with torch.no_grad():
                logits = model(ids, trace=trace)[0]
            expected = smallthinker.decode_array(s["logits"])
            d_logits = (logits - expected).abs().max().item()
            d_inputs = (torch.stack([x[0] for x in trace["layer_inputs"]]) - smallthinker.decode_array(s["layer_inputs"])).abs().max().item()
            d_router = (torch.stack([x[0] for x in trace["router_logits"]]) - smallthinker.decode_array(s["router_logits"])).abs().max().item()
            d_norm = (trace["final_norm_out"][0] - smallthinker.decode_array(s["final_norm_out"])).abs().max().item()
            chosen = [x[0].tolist() for x in trace["topk_experts"]]
            same_choice = all(set(a) == set(b) for la, lb in zip(chosen, s["topk_experts"]) for a, b in zip(la, lb))
            full = torch.tensor([s["full_sequence_ids"]])
            with torch.no_grad():
                d_full = (model(full)[0] - smallthinker.decode_array(s["full_sequence_logits"])).abs().max().item()
            worst = max(worst, d_logits, d_full)
            print(f"{name:14} {sequence:5} T={ids.shape[1]:3}  max|Δ| logits {d_logits:.2e}  full sequence {d_full:.2e}  "
                  f"layer inputs {d_inputs:.2e}  router {d_router:.2e}  final norm {d_norm:.2e}  "
                  f"experts {'same' if same_choice else 'DIFFERENT'}")
            if not same_choice:
                worst = float("inf")
    print(f"worst logit difference {worst:.2e} (limit {LIMIT:.0e}):", "ok" if worst <= LIMIT else "FAILED")
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
