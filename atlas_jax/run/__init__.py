"""The run machinery the SFT and RL loops share: setup (in run order), the log-prob
layout, step caching and the non-finite guard, train state, optimizer, metrics, plots."""
