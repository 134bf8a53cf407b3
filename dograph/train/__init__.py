"""The training loop and what it owns: ``trainer``, ``optim``, ``checkpointer`` (named Stateful parts, DDP vs
FSDP), ``checkpoint`` (the file format), ``metrics``, ``weight_stats`` (ESS and effective mixture),
``validation``. Names no mixer."""
