"""LightningModules: thin wrappers that own optimisation, logging and metrics, and call anomgen for the algorithm."""
