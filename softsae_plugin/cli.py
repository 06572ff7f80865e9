"""The `sae-lens` command: each subcommand's own module parses its options; this one dispatches and reports errors.

`sae-lens train` is softsae_plugin.training.command (SAE-Lens' runner, any registered architecture), `sae-lens eval`
is softsae_plugin.evaluate (SAEBench's evaluations), `sae-lens push` is softsae_plugin.hub.push (the Hub) and
`sae-lens show` is softsae_plugin.show (a page of text shaded by k_hat or L0).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

import softsae_plugin  # noqa: F401  (registers softsae before any subcommand reads SAE-Lens' registry)

# Subcommand -> (the module whose `main(argv)` runs it, its one-line help). Imported on use: `sae-lens push` need
# not load SAEBench.
COMMANDS = {
    "train": ("softsae_plugin.training.command", "train an SAE with SAE-Lens' runner (sae-lens train --help)"),
    "eval": ("softsae_plugin.evaluate", "run SAEBench's evaluations on SAEs (sae-lens eval --help)"),
    "push": ("softsae_plugin.hub.push", "publish a checkpoint to the Hugging Face Hub (sae-lens push --help)"),
    "show": ("softsae_plugin.show", "write an HTML page of text shaded by k_hat or L0 (sae-lens show --help)"),
}


# Where torchrun asks each rank to write the exception that ended it (torch.distributed.elastic's `record`).
ERROR_FILE_VARIABLE = "TORCHELASTIC_ERROR_FILE"
# What a user's mistake raises (a bad option, value, file or checkpoint): reported in one line, like argparse does.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, argparse.ArgumentError)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `sae-lens` console script.

    A user's mistake ends the command with `sae-lens <command>: error: ...` and exit status 2; `--debug` shows
    the traceback instead, and any other exception (a real fault) always does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: sae-lens {{{','.join(COMMANDS)}}} ... [--debug]")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:6s} {help_text}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    debug = "--debug" in argv
    command, args = argv[0], [arg for arg in argv[1:] if arg != "--debug"]
    try:
        run = importlib.import_module(COMMANDS[command][0]).main
        if ERROR_FILE_VARIABLE in os.environ:  # under torchrun: its failure summary then shows this rank's error
            run = record(run)
        run(args)
    except USER_ERRORS as err:
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sae-lens {command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
