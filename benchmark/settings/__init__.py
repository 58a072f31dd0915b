"""Settings: every option declared once, the merge defaults < experiment file < command line, RunConfig and Experiment (no torch)."""
