"""One module per asset kind: sources, task_vectors, merges (+ checks), evals, leaderboard."""
