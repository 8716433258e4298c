"""studio train: fine-tune a base model on a subject with any adapter (or fully); resumable.

Every flag can also come from a YAML file (--config FILE.yaml, keys = flag names); flags given on the
command line win. The effective config is written into the run folder.
"""
import argparse
import os


def add_config_arguments(p):
    """One flag per TrainConfig field (shared with `studio jobs submit`). Flags not given stay unset,
    so a YAML config can supply them."""
    from dataclasses import MISSING, fields

    from studio.train import TrainConfig

    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML file of settings (flags given here win)")
    for f in fields(TrainConfig):
        if f.metadata.get("yaml_only"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = f.metadata.get("kind") or type(default)
        if f.metadata.get("table"):
            shown = "the method table: studio train --show-defaults METHOD"
        elif f.name == "class_prompt":
            shown = "derived from --prompt"
        else:
            shown = default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        if f.metadata.get("kv"):
            p.add_argument("--option", dest=f.name, action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                           help=help_text)
        elif kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
        elif kind is list:
            p.add_argument(flag, dest=f.name, nargs="+", type=f.metadata.get("item", str), default=argparse.SUPPRESS,
                           help=help_text)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.type in ("int", int):
                kind = int
            elif f.type in ("float", float):
                kind = float
            p.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text)


def parse_option(text: str):
    """KEY=VALUE with VALUE read as YAML (numbers, booleans, lists)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"--option needs KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def config_from_args(args) -> dict:
    """YAML file < command-line flags. Returns a dict of TrainConfig keys."""
    from studio.train import TrainConfig, load_config_file

    settings = {}
    if getattr(args, "config", None):
        settings.update({str(k).replace("-", "_"): v for k, v in load_config_file(args.config).items()})
    names = {f for f in TrainConfig.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "adapter_options" in given:
        options = dict(settings.get("adapter_options") or {})
        options.update(parse_option(item) for item in given.pop("adapter_options"))
        given["adapter_options"] = options
    settings.update(given)
    return settings


def add_arguments(p):
    p.add_argument("--show-defaults", nargs="?", const="all", default=None, metavar="METHOD",
                   help="print the per-method (and per-family) defaults table and exit; with --base, that base's "
                        "values and where each comes from")
    add_config_arguments(p)


def show_defaults(args) -> str:
    from studio import defaults

    method = args.show_defaults
    if method != "all" and method not in defaults.METHODS:
        from adapters.registry import METHODS

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(defaults.METHODS)}")
    if getattr(args, "base", None) and method != "all":
        return defaults.describe(method, args.base)
    text = defaults.format_table(None if method == "all" else [method])
    return (text + "\n\nrank, targets, lr, steps, batch-size, prior-preservation and class-images left out take these "
                   "values (the base's family: unet or dit, read from its model_index.json; unknown families take "
                   "the unet row); the class prompt is --prompt without its identifier token (sks, ohwx, ...). "
                   "Any flag or YAML key overrides them.")


def run(args):
    from studio.train import TrainConfig, run_status, train

    if args.show_defaults:
        print(show_defaults(args))
        return 0
    config = TrainConfig.from_dict(config_from_args(args))
    run_dir = train(config)
    status = run_status(run_dir)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun: one line, not one per process
        print(status.get("result") or run_dir)
    return 0 if status.get("state") == "done" else 1
