"""The experiment framework that eval/'s commands share (`reproduce.py`, `study.py`, the benchmarks).

    stages       resumable stages: a result saved with its inputs and read back instead of rerun, the checkpoints
                 a stage cut short resumes from, the wall time of each
    saes         the four compared architectures: names, configs, the inference model users load
    text         English text from installed packages: sentences, news articles, token rows
    activations  activations to train on: embeddings, SAE-Lens' activation cache, synthetic inputs, SmolLM2's
    training     training SAEs: one on activations in memory, a set at the learning rates their own sweeps pick
    measures     what is measured on trained SAEs: matched FVE, loss recovered, adaptivity, training curves
    timing       wall time and peak memory of a call, and the machine it runs on
    traffic      the bytes a torchrun run's ranks hand to collectives per step, counted by the profiler
    plots        the figures two commands draw alike
    tables       numbers and rows as the reports and result files write them

The commands import it as `lab` (their own folder, eval/, is first on the path when they run as scripts).
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the commands run as scripts from anywhere in the checkout import this checkout
    sys.path.insert(0, str(REPO))
