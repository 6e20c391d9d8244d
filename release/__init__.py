"""Model registry moves and serving, beside each other because they share the alias rules.

- ``aliases``: pure planning of alias moves and rollbacks (what to set, what it replaces, how
  to undo it); no MLflow import.
- ``registry``: the MLflow side (MlflowClient calls, undone when a step fails), the content key
  that makes an unchanged re-run reuse its version, and the champion's policy directory.
- ``pyfunc``: the policy as an MLflow pyfunc model (MLflow's "models from code" file).
- ``serve``: ``rlhf serve``, MLflow's scoring protocol on the version an alias names, swapped
  without a restart when the alias moves.
"""
