"""`studio`: the command line. One sub-command per module; each module has add_arguments(parser) and run(args).

User mistakes end in one line on stderr and exit code 2; set STUDIO_DEBUG=1 for the traceback.
"""
import argparse
import logging
import os
import sys
from importlib import import_module

# sub-command -> (module, one-line help). Adding a command = one line here plus its module.
COMMANDS = {
    "generate": ("studio.commands.generate", "generate images from a prompt"),
    "bench": ("studio.commands.bench", "run a benchmark suite (JSON + table)"),
    "pretrain": ("studio.commands.pretrain", "train the embedded models from Fashion-MNIST (seeded, resumable)"),
    "eval": ("studio.commands.eval", "prompt accuracy and FD-classifier of a base model (+ adapter)"),
    "hipa": ("studio.commands.hipa", "train a HiPA one-step adapter (shared training loop, resumable)"),
    "train": ("studio.commands.train", "fine-tune on a subject with any adapter (resumable)"),
    "plan": ("studio.commands.plan", "predict a training run's peak memory; --budget: the fastest settings that fit"),
    "jobs": ("studio.commands.jobs", "the training queue: list, submit, cancel, resume, worker"),
    "library": ("studio.commands.library", "the adapter library: list, add, rename, delete, export as LoRA"),
    "serve": ("studio.commands.serve", "the studio in the browser (Gradio) on 127.0.0.1"),
    "dc-search": ("studio.commands.dc_search", "fit DC-Solver compensation ratios + CPR for a model (JSON)"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="studio", description="Diffusion Studio: fine-tune and sample diffusion models.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        mod = import_module(module)
        mod.add_arguments(command)
        command.set_defaults(_run=mod.run)
    return parser


def user_error_types():
    """Exceptions that mean "the input was wrong", not "the studio is broken"."""
    errors = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        result = args._run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_error_types() as exc:
        if os.environ.get("STUDIO_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
