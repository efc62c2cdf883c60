"""What every `python -m flux2lab.<command>` shares: quiet libraries, user errors without tracebacks."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable

from flux2lab.common.errors import Flux2LabError


def quiet_libraries() -> None:
    """Silence per-call chatter from transformers/diffusers/torchao that buries the command's own output."""
    warnings.filterwarnings("ignore", message=".*Enum subclass.*")
    for name in ("transformers", "diffusers", "torchao", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a command's main(); a Flux2LabError becomes `error: ...` on stderr and exit status 2."""
    quiet_libraries()
    try:
        code = main(argv)
    except Flux2LabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished work was saved.", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


# The trained built-in model: CPU-fast like tiny, but its quality numbers mean something (tiny's weights are random).
DEFAULT_MODEL = "mini"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="mini (small FLUX.2 trained on a synthetic world; prompts are its captions) | tiny "
                             "(random weights) | full-random | a hub id such as black-forest-labs/FLUX.2-dev | a "
                             f"local diffusers folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if present, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="model dtype (default: bf16 on GPU, fp32 on CPU)")

