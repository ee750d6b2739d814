"""The `vpfast` command line: `vpfast info`, `vpfast bench [OP ...]`, `vpfast check`, and the training
commands of vpfast.commands (`train`, `eval`, `predict`, `demo`)."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from .info import main

    return main()


def _bench(args) -> int:
    from .bench import run

    return run(args.ops, quick=args.quick, paired_rounds=args.paired_rounds, device=args.device, dtype=args.dtype)


def _check(args) -> int:  # reached only through build_parser() users; main() forwards `check` itself
    from .check import main

    return main(args.check_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="versions, build metadata and the op x backend availability table")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="run the benchmark suites and print one comparison table")
    p.add_argument("ops", nargs="*", help="suites to run (default: all), e.g. ddr_loss")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few rounds, in less time; its ratios are rough (the output says so)")
    p.add_argument("--paired-rounds", type=int, default=None, metavar="N",
                   help="alternating rounds per group for the paired ratio (default 5, 3 with --quick; 0: off)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where inputs live and what is timed: cpu (cpp backend) or cuda (cuda and triton backends, "
                        "CUDA-event timing)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or float64")
    p.set_defaults(func=_bench)
    p = sub.add_parser("check", help="GPU (or CPU) self-check: the device's tests and a short benchmark table "
                                     "(python -m vpfast.check --help)", add_help=False)
    p.add_argument("check_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_check)
    from .commands import add_subcommands  # train, eval, predict, demo

    add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:  # its options are vpfast.check's own (argparse would not pass them through)
        from .check import main as check_main

        return check_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
