"""The baselines DoGraph is compared against, each a dograph.mixing.Mixer."""
