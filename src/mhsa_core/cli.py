"""The `mhsa-core` command: one parser, a subcommand per tool.

    mhsa-core matrix ...   the backends agree (`mhsa_core.consistency.cli`)
    mhsa-core demo ...     the Keras 2 block under each backend (same module)
    mhsa-core bench ...    speed and memory (`mhsa_core.bench.command`)

Each tool adds its own subcommands; this module only dispatches, so that
neither tool imports the other. The parent process imports no framework (not
even Keras): the backends run in worker processes.

Exit status: what the subcommand returns (`mhsa-core matrix --help`,
`mhsa-core bench --help`); 2 on bad usage, with one line on stderr.
"""

import argparse
import sys

import mhsa_core
from mhsa_core.bench import command as bench_command
from mhsa_core.consistency import cli as consistency_cli

__all__ = ["build_parser", "main"]


def _bench(args):
    try:
        return bench_command.main(args)
    except OSError as e:  # a file of --json / --plot that cannot be written
        raise bench_command.BenchUsageError(str(e)) from None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mhsa-core",
        description=(
            "2-D multi-head self-attention for Keras 3, checked across backends."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {mhsa_core.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    consistency_cli.add_commands(sub)
    b = sub.add_parser(
        "bench",
        help="measure the layer's speed and memory on each backend",
        description=bench_command.DESCRIPTION,
        epilog=bench_command.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_command.add_arguments(b)
    b.set_defaults(func=_bench)
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    try:
        return args.func(args)
    except (consistency_cli.UsageError, bench_command.BenchUsageError) as e:
        print(f"mhsa-core: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
