"""Data: cohort and backbone registries, clinical tables, labels, splits, feature readers, graphs, bags, the synthetic generator and the leakage audit."""
