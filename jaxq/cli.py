"""The `jaxq` command line: eval (and, as they land, quantize, inspect, bench)."""

from __future__ import annotations

import argparse
import json
import sys

from jaxq import data


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=data.EVAL_SOURCE,
                   help=f"evaluation text: {', '.join(data.SOURCES)} or a text file (default %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help=f"directory holding wikitext2/ (default ${data.DATA_DIR_ENV} or ../shared/data)")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (quick: 512, full: 2048)")
    p.add_argument("--windows", type=int, default=64, help="number of windows (quick: 64)")
    p.add_argument("--full", action="store_true", help="full protocol: ctx 2048, every window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def cmd_eval(args: argparse.Namespace) -> int:
    import models
    from jaxq import evaluate

    lm = models.load(args.model, dtype=args.dtype)
    ctx, windows = (2048, None) if args.full else (args.ctx, args.windows)
    report = evaluate.perplexity_report(lm, lm.params, args.data, ctx=ctx, windows=windows,
                                        batch_size=args.batch_size, data_dir=args.data_dir,
                                        progress=not args.json)
    result = {"model": args.model, "data": args.data, **report.to_dict()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: perplexity {report.ppl:.4f} on {args.data} "
              f"({report.windows} windows x {report.ctx} tokens, {report.seconds:.1f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", help="perplexity of a model (PROTOCOL.md)")
    p.add_argument("--model", required=True, help="zoo name, HF directory, .gguf file or Hub id")
    _add_eval_options(p)
    p.set_defaults(run=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as err:  # our errors carry the message the user needs
        print(f"jaxq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
