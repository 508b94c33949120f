"""Models: tasks (built-in and brought with --model), their training, facts and quality metrics."""
