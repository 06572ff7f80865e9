"""Training: single runs on a language model (SAE-Lens' runner) or on activation files, sweeps, data-parallel
training under torchrun, the guards around every run, and the summary each run writes."""
