"""Studies behind the tiny recipe's choices; their results are in docs/experiments.md."""
