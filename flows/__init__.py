"""Flows and the ``rlhf`` command line; the flows only compose the stages in ``tasks/``."""

DEFAULT_CONFIG = "configs/demo.yaml"
"""The config every command reads unless ``--config`` names another (the demo)."""
