"""The search: the space of pipelines, building one candidate, the Ray Tune trial, the searcher (Optuna), selection, the latency predictor, caches and the base model."""
