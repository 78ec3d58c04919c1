"""One module per asset kind: sources, task_vectors, guidance, merges (+ checks; merge_parts: the split
merge; merge_prep: what both prepare), evals, leaderboard, checks."""
