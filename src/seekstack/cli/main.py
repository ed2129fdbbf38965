"""`seekstack` console script (also `python -m seekstack`).

seekstack --help            list the subcommands
seekstack demo              run every stage of the system that exists so far
seekstack bench eplb        run one benchmark (`seekstack bench --list` lists them)
seekstack eplb load.npy     a component's own subcommand
"""

from __future__ import annotations

import argparse
import sys

from seekstack import __version__
from seekstack.cli.registry import BENCHMARKS, COMMANDS, available


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seekstack", description="DeepSeek's open infrastructure stack, everywhere.")
    parser.add_argument("--version", action="version", version=f"seekstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run every stage that exists so far, with a final summary")
    demo.add_argument("--workdir", default="seekstack-demo", help="where the demo writes its files")
    demo.add_argument("--only", nargs="*", default=None, help="run only these stages")

    bench = sub.add_parser("bench", help="run a benchmark: " + ", ".join(e.name for e in available(BENCHMARKS)))
    bench.add_argument("name", nargs="?", help="benchmark name, or 'all'")
    bench.add_argument("--list", action="store_true", help="list the benchmarks")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")

    for entry in available(COMMANDS):
        p = sub.add_parser(entry.name, help=entry.help, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A component's subcommand parses its own arguments (including --help), so hand over argv untouched.
    entry = next((e for e in available(COMMANDS) if argv and e.name == argv[0]), None)
    if entry is not None:
        try:
            return int(entry.load().main(argv[1:]) or 0)
        except (ValueError, FileNotFoundError) as exc:  # bad input: one clear line, not a traceback
            print(f"seekstack {entry.name}: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from seekstack.cli.demo import run_demo

        return run_demo(args.workdir, args.only)
    from seekstack.bench.runner import run_benchmarks

    return run_benchmarks(args.name, args.args, list_only=args.list)


if __name__ == "__main__":
    raise SystemExit(main())
