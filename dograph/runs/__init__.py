"""Runs: ``app`` (the composition root), ``pipeline`` (stages), ``sweep`` and ``sweep_job`` (proxy
sweeps), ``summary`` (the table a run ends with)."""
