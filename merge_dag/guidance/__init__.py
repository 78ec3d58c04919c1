"""Data-guided merging, the pure core (torch + safetensors + transformers; no Dagster).

calibration  rows from a jsonl file (text, prompt + answer, or a chat) -> padded token batches, with
             an answer mask for answer-only statistics
model        load a checkpoint folder as a causal LM for a statistics pass
activations  forward hooks on every linear of the decoder layers: per-channel input statistics
             (and optionally the Gram matrix X^T X), saved as safetensors + json
lewis        LEWIS importance I(l, m) and the density allocation it implies
sens         Sens-Merging: per-layer sensitivity, logit alignment, per-layer coefficients
aim          AIM: relax a merged task vector per input channel by the base's activation magnitude
regmean      RegMean: closed-form merge of each linear from the experts' Gram matrices
fisher       Fisher merging: each expert's diagonal Fisher (one backward pass per row), the Fisher-weighted average
offline      a guided merge without Dagster (`merge-dag merge`): the statistics in memory, then the merge

Every function that does tensor work takes `device` (default "cpu"); statistics are accumulated
in float32 whatever the model's dtype.
"""
