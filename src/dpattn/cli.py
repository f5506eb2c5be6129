"""The `dpattn` command line. All flags live here."""

from __future__ import annotations

import argparse
import sys

from dpattn.tiny import (
    ARCHS,
    add_size_overrides,
    ensure_default_model,
    make_tiny_model,
    overrides_from_args,
)


def _add_layout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-path", help="HF-format model directory (default: the embedded tiny MoE model)"
    )
    p.add_argument(
        "--tp", "--tp-size", dest="tp", type=int, default=1, help="ranks of one model replica (T)"
    )
    p.add_argument(
        "--dp",
        "--dp-size",
        dest="dp",
        type=int,
        default=1,
        help="DP attention groups (D); A = T / D",
    )
    p.add_argument(
        "--ep",
        action="store_true",
        help="expert parallelism: whole experts per rank (ep_size = tp_size)",
    )
    p.add_argument(
        "--moe-dense-tp-size",
        type=int,
        choices=[1],
        default=None,
        help="1: scattered layout for dense MLP layers",
    )
    p.add_argument("--dp-padding-mode", choices=["auto", "max_len", "sum_len"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--backend",
        choices=["gloo", "thread"],
        default="gloo",
        help="rank processes or in-process threads",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpattn", description="LLM inference with data-parallel attention"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "make-tiny-model", help="write a tiny random HF-format checkpoint + tokenizer"
    )
    tiny.add_argument("--arch", choices=ARCHS, required=True)
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--per-expert-keys", action="store_true", help="legacy per-expert MoE keys, not fused"
    )
    add_size_overrides(tiny)

    verify = sub.add_parser(
        "verify", help="check a parallel layout's logits against HF transformers"
    )
    _add_layout_flags(verify)
    verify.add_argument(
        "--reference-model-path", help="compare against another checkpoint (must then fail)"
    )
    verify.add_argument("--num-prompts", type=int, default=5)
    verify.add_argument("--decode-steps", type=int, default=4)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument(
        "--no-idle-group",
        dest="idle_group",
        action="store_false",
        help="give every DP group requests",
    )
    verify.add_argument(
        "--tolerance", type=float, default=None, help="max |Δlogit| (default 1e-4 fp32, 0.25 bf16)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny-model":
        path = make_tiny_model(
            args.arch,
            args.out,
            seed=args.seed,
            fused_experts=not args.per_expert_keys,
            **overrides_from_args(args),
        )
        print(path)
        return 0
    if args.command == "verify":
        from dpattn.verify import VerifyConfig, print_report, verify

        cfg = VerifyConfig(
            model_path=args.model_path or str(ensure_default_model()),
            tp=args.tp,
            dp=args.dp,
            ep=args.ep,
            moe_dense_tp_size=args.moe_dense_tp_size,
            dp_padding_mode=args.dp_padding_mode,
            dtype=args.dtype,
            backend=args.backend,
            num_prompts=args.num_prompts,
            decode_steps=args.decode_steps,
            seed=args.seed,
            tolerance=args.tolerance,
            reference_model_path=args.reference_model_path,
            idle_group=args.idle_group,
        )
        report = verify(cfg)
        print_report(report)
        return 0 if report["ok"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
