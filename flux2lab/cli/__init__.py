"""What every flux2lab command shares: its parser, quiet libraries, user errors without tracebacks."""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable

from flux2lab.common.errors import Flux2LabError
from flux2lab.common.values import MAX_SEED

# The trained built-in model: CPU-fast like tiny, but its quality numbers mean something (tiny's weights are random).
DEFAULT_MODEL = "mini"
MODEL_HELP = ("mini (small FLUX.2 trained on a synthetic world; prompts are its captions) | tiny (random weights) | "
              "full-random | a hub id such as black-forest-labs/FLUX.2-dev | a local diffusers folder")

# Usage names of command modules launched by the `flux2lab` script (cli.main); the others are `python -m flux2lab.X`.
_progs: dict[str, str] = {}


def quiet_import_warnings() -> None:
    """Silence what torch/torchao/diffusers log while being imported; runs when a command imports this module,
    before the command's own imports (library code and notebooks that import flux2lab keep their settings)."""
    warnings.filterwarnings("ignore", message=".*Enum subclass.*")
    for name in ("transformers", "diffusers", "torchao", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # torchao 0.18 registers enums with torch's pytree at import, and torch >= 2.11 logs a deprecation warning for
    # each; diffusers warns at import that torchao 0.18 lacks tensor classes of older torchao checkpoints, which
    # flux2lab never loads. Both loggers are named because their libraries reset their root loggers at import.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)


quiet_import_warnings()


def quiet_libraries() -> None:
    """Silence per-call chatter from transformers/diffusers/torchao that buries the command's own output."""
    quiet_import_warnings()
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends an option's help with "(default: X)", except where X says nothing: None, a flag's on/off value, []."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0 or action.default == []:
            return action.help
        return super()._get_help_string(action)


def command_parser(module: str, description: str) -> argparse.ArgumentParser:
    """The parser of command module flux2lab.<module> (e.g. "zoo.train"): shared help format, usage name."""
    return argparse.ArgumentParser(prog=_progs.get(module, f"python -m flux2lab.{module}"), description=description,
                                   formatter_class=HelpFormatter)


def set_prog(module: str, prog: str) -> None:
    """Name command module flux2lab.<module> `prog` in its usage and errors (how the `flux2lab` script ran it)."""
    _progs[module] = prog


# ------------------------------------------------------------------------------------------ argument types
# Values out of range are refused while parsing (`PROG: error: argument --flag: ...`, exit 2), before any work,
# and a given 0 is a value like any other, never "not given".


def int_in_range(low: int, high: int | None = None, allowed: str | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` (to `high`); `allowed` says so in the message."""
    allowed = allowed or (f"an integer >= {low}" if high is None else f"an integer from {low} to {high}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give {allowed}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {allowed}")
        return value

    return parse


positive_int = int_in_range(1)
non_negative_int = int_in_range(0)
seed_int = int_in_range(0, MAX_SEED, "a seed from 0 to 2**63-1")
sampler_seed_int = int_in_range(0, 2**32 - 1, "a seed from 0 to 2**32-1 (numpy's range)")


def _float(text: str, allowed: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {allowed}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text} is out of range; give {allowed}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite number (not nan or inf)."""
    return _float(text, "a finite number", lambda v: True)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return _float(text, "a finite number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    return _float(text, "a finite number >= 0", lambda v: v >= 0)


def folder_name(text: str) -> str:
    """An argparse type: a name that becomes one folder under an output folder (no separators, no '..')."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder: use letters, digits, '.', '_' and '-' (no '/' or "
                                         "'..'), starting with a letter or digit")
    return text


def device_name(text: str) -> str:
    """An argparse type: a device torch knows by that name (cpu, cuda, cuda:N); whether it is present is checked
    where the model loads."""
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name; give cpu, cuda or cuda:N") from None
    return text


def add_model_args(parser: argparse.ArgumentParser, model_default: str | None = DEFAULT_MODEL,
                   model_help: str = MODEL_HELP) -> None:
    """--model, --device and --dtype (`parser` may be an argument group)."""
    parser.add_argument("--model", default=model_default, help=model_help)
    parser.add_argument("--device", type=device_name, default=None,
                        help="cpu | cuda | cuda:N (default: cuda if present, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="model dtype (default: bf16 on GPU, fp32 on CPU)")


def shape_overrides(args: argparse.Namespace) -> dict[str, int]:
    """The --steps/--height/--width given on the command line, as Recipe.replace takes them (a command may lack
    some of the flags)."""
    given = {k: getattr(args, k, None) for k in ("steps", "height", "width")}
    return {k: v for k, v in given.items() if v is not None}
