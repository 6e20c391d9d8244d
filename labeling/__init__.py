"""The built-in labeling page: people choose the better response of each pair in a browser.

- ``labeling.batch``: the batch format (a JSONL file of pairs) and the labels file beside it,
  appended and flushed per label, with undo and resume.
- ``labeling.server``: a stdlib HTTP server, token-protected, serving the page in ``static/``
  and a small JSON API; ``rlhf label BATCH`` starts it.

It reads data through ``dataio`` and imports nothing from ``tasks/`` or ``flows/``.
"""
