"""The run's report (Markdown) and its plots."""
