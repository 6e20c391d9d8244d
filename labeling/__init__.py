"""Labeling: people choose the better response of each pair, on our page or in Label Studio.

- ``labeling.batch``: the batch format (a JSONL file of pairs) and the labels file beside it,
  appended and flushed per label, with undo and resume.
- ``labeling.server``: a stdlib HTTP server, token-protected, serving the page in ``static/``
  and a small JSON API; ``rlhf label BATCH`` starts it.
- ``labeling.label_studio``: the same batch as a project in a real Label Studio (REST API),
  its annotations exported back into the labels format; ``rlhf label BATCH --label-studio URL``.

It reads data through ``dataio`` and imports nothing from ``tasks/`` or ``flows/``.
"""
