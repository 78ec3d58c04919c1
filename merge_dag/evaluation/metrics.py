"""Per-document metric functions referenced by the task YAMLs (``!function`` tags).

Kept free of heavy imports: lm-eval imports this module while it loads the task configs.
"""

from __future__ import annotations


def process_loglikelihood(doc: dict, results: list) -> dict:
    """One ``loglikelihood`` request per document: the answer given the prompt.

    ``acc``: 1 if greedy decoding would produce exactly the answer's tokens, else 0.
    ``logprob``: the answer's total log-probability (natural log; higher is better), which moves
    with small changes of the weights even when greedy exact match does not.
    """
    if len(results) != 1:
        raise ValueError(f"process_loglikelihood: expected 1 result per document, got {len(results)}")
    ll, is_greedy = results[0]
    return {"acc": int(bool(is_greedy)), "logprob": float(ll)}
