"""The training step: how a step measures what the mixer asked for and applies its weights.

``runners`` (plain and reweighted steps, the step context), ``projected`` (projected per-sample
gradients), ``capture`` (the hooks), ``projection`` (the Kronecker-factored projection), ``timing``;
``build.build_step_runner`` picks the cheapest runner for a mixer."""
