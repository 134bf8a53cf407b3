"""Downstream evaluation: ``downstream`` (lm-eval), ``tasks`` (local tasks), ``cli``
(``python -m dograph.eval RUN_DIR``)."""
