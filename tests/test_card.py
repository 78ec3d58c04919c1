"""The model card (README.md of a merged model): the method's reference comes from its class."""

from merge_dag.core.card import build_card, card_files, method_reference
from merge_dag.core.methods import METHODS


def card_for(method: str) -> dict:
    inputs = [
        {"role": "base", "model": "b", "path": "/b", "fingerprint": "sha256:00"},
        {"role": "model", "model": "e", "path": "/e", "fingerprint": "sha256:11"},
    ]
    return build_card(method, {"merge_method": method}, "r.yaml", inputs, "bfloat16", 0, "b", 3, {"name": "x"})


def test_the_card_cites_the_methods_reference_url():
    readme = card_files(card_for("ties"))["README.md"]
    assert "Method reference: <https://arxiv.org/abs/2306.01708>" in readme
    assert method_reference("ties") == METHODS["ties"].reference_url


def test_no_reference_line_for_a_method_without_one():
    for method in ("passthrough", "regmean"):  # no paper of its own; not a registered method
        assert method_reference(method) == ""
        assert "Method reference" not in card_files(card_for(method))["README.md"]


def test_card_keys_keep_their_order():
    assert list(card_for("ties")) == [
        "merge_dag_version",
        "code_version",
        "method",
        "recipe",
        "recipe_file",
        "inputs",
        "out_dtype",
        "seed",
        "tokenizer_source",
        "tensor_count",
        "name",
    ]
