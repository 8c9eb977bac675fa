"""Launch scripts: command line entry points. They know nothing of P-tuning beyond calling ptuning.experiment."""
