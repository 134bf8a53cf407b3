"""The benchmark scripts, run as modules from the repository root: ``python -m benchmarks.step_time`` (README.md).

A package so that the scripts import each other and ``benchmarks.common`` by name (no ``sys.path``
edits); ``-m`` puts the repository root, where ``dograph`` and ``baselines`` live, on the path too.
"""
