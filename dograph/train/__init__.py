"""The training loop and what it owns: ``trainer``, ``optim``, ``checkpoint``, ``metrics``,
``weight_stats`` (ESS and effective mixture), ``validation``. Names no mixer."""
