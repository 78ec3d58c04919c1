"""A merge of the real zoo comes out right: SmolLM2-135M-Instruct with its three LoRA experts, merged by
`merge-dag merge` straight from the adapters (mergekit's `base+adapter` form).

Needs the real zoo (`merge-dag zoo --size real`, ~25 min on 2 cores; CI does not build it): skipped
when data/models/real/zoo.json (or $MERGE_DAG_REAL_ZOO) is absent. What it checks:
- tied embeddings stay tied: no `lm_head.weight` in the output, config.json's tie_word_embeddings and
  vocabulary as the base's, and the folder reloads to exactly the logits of the merge computed in
  memory (base + 0.5 x the sum of the experts' (alpha/r) B A, by peft's own merge of each adapter);
- the chat template, special tokens and generation config of the base are carried to the output;
- the merged model generates sensibly through its chat template: on validation questions of two
  tasks its greedy answers have each task's answer format (number words; day month-name year).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("MERGE_DAG_REAL_ZOO") or ROOT / "data" / "models" / "real")
TASKS = ("acronym", "numwords", "isodate")
LAMBDA = 0.5

pytestmark = pytest.mark.skipif(
    not (ZOO / "zoo.json").is_file(), reason=f"no real zoo at {ZOO} (build it with `merge-dag zoo --size real`)"
)


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "ta"
    recipe = out.parent / "ta.yaml"
    recipe.write_text(
        "\n".join(
            [
                "merge_method: task_arithmetic",
                f"base_model: {ZOO / 'base'}",
                "models:",
                *[f"  - model: {ZOO / 'base'}+{ZOO / 'adapters' / t}" for t in TASKS],
                f"parameters: {{weight: 1.0, lambda: {LAMBDA}}}",
                "out_dtype: float32",
            ]
        )
        + "\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "merge_dag.cli", "merge", str(recipe), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return out


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_tied_embeddings_and_config(merged: Path):
    base_cfg = json.loads((ZOO / "base" / "config.json").read_text())
    cfg = json.loads((merged / "config.json").read_text())
    assert base_cfg["tie_word_embeddings"] is True and cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == base_cfg["vocab_size"] == 49152
    names = set(_state(merged))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_reload_gives_the_logits_of_the_merge_in_memory(merged: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _state(ZOO / "base")
    expect = {k: v.float().clone() for k, v in base.items()}
    for t in TASKS:  # peft's own merged weights: base + (alpha/r) B A, per adapted module
        m = AutoModelForCausalLM.from_pretrained(str(ZOO / "base"), dtype=torch.float32)
        dense = PeftModel.from_pretrained(m, str(ZOO / "adapters" / t)).merge_and_unload().state_dict()
        for k in expect:
            expect[k] += LAMBDA * (dense[k].float() - base[k].float())
    got = _state(merged)
    worst = max((got[k].float() - expect[k]).abs().max().item() for k in expect)
    assert worst < 1e-5, worst

    ids = torch.tensor([[1, 504, 3458, 314, 260, 1789, 28, 2]])
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(ZOO / "base"), dtype=torch.float32)
    ref.load_state_dict({**expect, "lm_head.weight": expect["model.embed_tokens.weight"]}, strict=False)
    ref.tie_weights()
    with torch.no_grad():
        a, b = model(ids).logits, ref.eval()(ids).logits
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def test_chat_template_special_tokens_and_generation_config_carried(merged: Path):
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(str(merged)), AutoTokenizer.from_pretrained(str(ZOO / "base"))
    assert a.chat_template == b.chat_template and a.chat_template
    assert (a.bos_token, a.eos_token, a.pad_token) == (b.bos_token, b.eos_token, b.pad_token)
    assert a.convert_tokens_to_ids("<|im_end|>") == b.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen == json.loads((ZOO / "base" / "generation_config.json").read_text())


NUMBER = re.compile(
    r"^(zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|"
    r"fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|"
    r"ninety|hundred|thousand|[ -])+$"
)
DATE = re.compile(
    r"^\d{1,2} (January|February|March|April|May|June|July|August|September|October|November|"
    r"December) \d{4}$"
)


def test_merged_model_answers_in_each_tasks_format_through_the_chat_template(merged: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_dag.zoo.real.generate import generate, normalize
    from merge_dag.zoo.real.tasks import SYSTEM_PROMPT, split_rows

    tok = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    for task, pattern in (("numwords", NUMBER), ("isodate", DATE)):
        rows = split_rows(task)["validation"][:10]
        # the prompt is the merged tokenizer's own chat template with the zoo's system prompt
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": rows[0]["question"]}]
        assert rows[0]["prompt"] == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        answers = [normalize(g) for g in generate(model, tok, [r["prompt"] for r in rows], 12, batch_size=10)]
        assert all(pattern.match(a) for a in answers), (task, answers)
