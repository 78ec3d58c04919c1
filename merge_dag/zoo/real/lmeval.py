"""lm-eval task YAMLs of the real zoo, written under data/real/tasks/ (render and run them with
merge_dag.evaluation: ``evaluate(model, ["real"], tasks_dir=Path("data/real/tasks"))``).

Per task two ``generate_until`` tasks read the rows of data/real/eval/: ``real_<task>`` the test
split, ``real_<task>_val`` the validation split (tags ``real`` and ``real_val``). Each row's
``prompt`` is already the chat template's text (system prompt asking for the bare answer, the
question, the assistant header), so lm-eval needs no chat-template option and sees the exact
tokens of training; generation is greedy and stops at ``<|im_end|>`` or a newline; the metric is
``exact_match`` against ``answer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tasks import REAL_TASKS, get_task

PREFIX = "real_"


def task_name(task: str, split: str = "test") -> str:
    return f"{PREFIX}{task}" + ("" if split == "test" else "_val")


def task_configs(task: str) -> dict[str, dict[str, Any]]:
    t = get_task(task)
    out = {}
    for split, tag in (("test", "real"), ("validation", "real_val")):
        name = task_name(task, split)
        out[f"{name}.yaml"] = {
            "task": name,
            "tag": [tag],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": f"../eval/{task}.{split}.jsonl"}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": "",
            "num_fewshot": 0,
            "generation_kwargs": {
                "until": ["<|im_end|>", "\n"],
                "do_sample": False,
                "max_gen_toks": t.max_answer_tokens,
            },
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "description": t.description, "split": split},
        }
    return out


def task_files(tasks: tuple[str, ...] = REAL_TASKS) -> dict[str, str]:
    from ...evaluation.tasks import dump_task_yaml
    from ..lmeval import HEADER

    return {name: HEADER + dump_task_yaml(cfg) for t in tasks for name, cfg in task_configs(t).items()}


def write_task_files(tasks_dir: Path, tasks: tuple[str, ...] = REAL_TASKS) -> list[Path]:
    from ..skills import write_if_changed

    tasks_dir = Path(tasks_dir)
    return [write_if_changed(tasks_dir / name, text) for name, text in task_files(tasks).items()]
