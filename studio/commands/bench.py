"""studio bench SUITE --json out.json: run a benchmark suite, write JSON, print a table."""
import sys
from importlib import import_module

# suite -> module under studio.bench. Adding a suite = one line here plus its module.
SUITES = {
    "adapters-micro": "studio.bench.adapters_micro",
    "gpu": "studio.bench.gpu",
    "hires": "studio.bench.hires",
    "samplers": "studio.bench.samplers",
    "onestep": "studio.bench.onestep",
    "subject": "studio.bench.subject",
}


def add_arguments(p):
    sub = p.add_subparsers(dest="suite", metavar="SUITE")
    for name, module in SUITES.items():
        mod = import_module(module)
        suite = sub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
        suite.add_argument("--json", default=None, help="write the results here")
        mod.add_arguments(suite)
        suite.set_defaults(_suite=mod)


def run(args):
    import datetime

    from studio.bench import machine, markdown_table
    from studio.files import write_json

    if not getattr(args, "_suite", None):
        raise ValueError(f"name a suite: studio bench {{{','.join(SUITES) or 'none yet'}}} --json out.json")
    result = args._suite.run(args)
    result.setdefault("suite", args.suite)
    result.setdefault("machine", machine())
    result.setdefault("date", datetime.date.today().isoformat())
    if args.json:
        write_json(args.json, result)
    print(markdown_table(result.get("rows", []), result.get("columns")))
    sys.stdout.flush()
    return 0
