"""What each data-guided statistic costs, relative to one plain forward pass over the same
calibration batches (same model, device and batch settings as the Dagster assets use).

    .venv/bin/python bench/guidance_cost.py [--size ci|bench] [--repeat 3] [--device cpu]

Needs the zoo (`merge-dag zoo --size ...`). Each timing is the minimum of --repeat runs; model
loading and tokenization are excluded (the assets pay them once per step, not per pass). The
alignment row is one ordered expert pair (two forward passes: the specialist's and the other's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="ci", choices=["ci", "bench"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from merge_dag.guidance.activations import collect_activation_stats
    from merge_dag.guidance.calibration import load_batches, load_tokenizer
    from merge_dag.guidance.fisher_info import fisher_diagonal
    from merge_dag.guidance.lewis import importance, sequential_wanda_stats
    from merge_dag.guidance.model import load_model
    from merge_dag.guidance.sens import logit_kl, sensitivity

    models = ROOT / "data" / "models" / args.size
    cal = ROOT / "data" / "calibration" / "arev.jsonl"
    base, expert, other = models / "base", models / "arev", models / "sort"
    tok = load_tokenizer(base)
    batches = load_batches(cal, tok, batch_size=args.batch_size, device=args.device)
    m_base = load_model(base, device=args.device)
    m_exp = load_model(expert, device=args.device)
    m_other = load_model(other, device=args.device)
    tokens = sum(b.tokens for b in batches)

    def forward():
        with torch.no_grad():
            for b in batches:
                m_base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    stats = collect_activation_stats(m_base, batches, device=args.device)
    rows = {
        "forward pass (reference)": best(forward, args.repeat),
        "activations (count, Σx², Σ|x|, max|x|)": best(
            lambda: collect_activation_stats(m_base, batches, device=args.device), args.repeat
        ),
        "grams (XᵀX, RegMean)": best(
            lambda: collect_activation_stats(m_base, batches, device=args.device, gram=True), args.repeat
        ),
        "sensitivity (forward + backward)": best(lambda: sensitivity(m_exp, batches, device=args.device), args.repeat),
        "fisher (forward + backward per row)": best(
            lambda: fisher_diagonal(m_exp, batches, device=args.device), args.repeat
        ),
        "alignment, one expert pair (2 forwards)": best(
            lambda: logit_kl(m_other, m_exp, batches, device=args.device), args.repeat
        ),
        "importance (weights × statistics, no pass)": best(
            lambda: importance(stats, base, device=args.device), args.repeat
        ),
    }
    # sequential Wanda prunes the model it measures: a fresh copy per run
    seq = []
    for _ in range(args.repeat):
        m = load_model(base, device=args.device)
        t0 = time.perf_counter()
        sequential_wanda_stats(m, batches, device=args.device)
        seq.append(time.perf_counter() - t0)
    rows["activations, sequential Wanda (LEWIS official)"] = min(seq)

    ref = rows["forward pass (reference)"]
    params = sum(p.numel() for p in m_base.parameters())
    print(
        f"{args.size} zoo: {params / 1e6:.2f}M parameters, {len(batches)} batches, {tokens} tokens, "
        f"device {args.device}, min of {args.repeat}\n"
    )
    print("| statistic | seconds | × one forward pass |\n|---|---:|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v:.4f} | {v / ref:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"size": args.size, "tokens": tokens, "params": params, "seconds": rows}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
