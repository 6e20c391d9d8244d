"""RLHF math and model helpers: torch and transformers only (no Prefect, MLflow or GX here)."""
