"""The `dpattn` command line: checks the flags, then runs the command (the flags themselves
are defined in cli_parser.py). Options a request carries are checked before anything loads."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from dpattn.cli_errors import run_reporting_errors
from dpattn.cli_parser import build_parser, engine_options
from dpattn.config import resolve_device
from dpattn.executor.sampling_params import SamplingParams
from dpattn.logs import configure_logging
from dpattn.models.model_path import resolve_model_path
from dpattn.models.tiny import make_tiny_model, overrides_from_args

__all__ = ["build_parser", "engine_options", "main"]


def _follower(args: argparse.Namespace) -> bool:
    """On node 1..N-1 run this host's ranks until node 0 stops them; True if we did."""
    if args.node_rank == 0:
        return False
    from dpattn.runtime.topology import run_follower_node

    run_follower_node(resolve_model_path(args.model_path), **engine_options(args))
    return True


def _router(args: argparse.Namespace) -> int:
    from dpattn.disaggregation.pd_router import parse_prefill, serve_router

    if not args.pd_disaggregation:
        raise ValueError("dpattn router: only --pd-disaggregation is supported")
    prefill = [parse_prefill(p) for p in args.prefill]
    serve_router(prefill, args.decode, args.host, args.port, args.log_level)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dpattn.entrypoints.http_server import serve

    serve(
        resolve_model_path(args.model_path),
        host=args.host,
        port=args.port,
        max_queued_requests=None if args.max_queued_requests < 0 else args.max_queued_requests,
        served_model_name=args.served_model_name,
        chat_template=args.chat_template,
        access_log=args.access_log,
        request_timeout_s=args.request_timeout,
        api_key=args.api_key,
        max_body_bytes=args.max_request_body_bytes,
        keep_alive_on_engine_death=args.keep_alive_on_engine_death,
        **engine_options(args),
    )
    return 0


def _sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    """generate's sampling flags, as a request's sampling_params."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _input_ids(args: argparse.Namespace) -> list[int] | None:
    if not args.input_ids:
        return None
    try:
        return [int(x) for x in args.input_ids.split(",")]
    except ValueError:
        raise ValueError(
            f"--input-ids takes comma-separated integers, not {args.input_ids!r}"
        ) from None


def _generate(args: argparse.Namespace) -> int:
    from dpattn.entrypoints.engine import Engine

    params, ids = _sampling_params(args), _input_ids(args)
    with Engine(resolve_model_path(args.model_path), **engine_options(args)) as engine:
        if ids is not None:
            outs = [engine.generate(input_ids=ids, sampling_params=params)]
        else:
            outs = engine.generate(prompt=args.prompt, sampling_params=params)
    for prompt, out in zip(args.prompt or [args.input_ids], outs):  # type: ignore[arg-type]
        print(json.dumps(out) if args.json else f"{prompt}{out['text']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dpattn.entrypoints.engine import Engine
    from dpattn.tools.bench import BenchConfig, compare_with_transformers, run_offline

    if args.base_url:
        from dpattn.tools.bench_online import OnlineBenchConfig, run_online

        online = OnlineBenchConfig(
            args.base_url,
            args.num_prompts,
            args.input_len,
            args.output_len,
            args.request_rate,
            args.concurrency,
            args.seed,
        )
        report = run_online(online, args.plot)
    elif args.compare_llamacpp:
        from dpattn.tools.bench_llamacpp import format_table as llamacpp_table
        from dpattn.tools.bench_llamacpp import run_compare

        report = run_compare(
            resolve_model_path(args.model_path),
            engine_options(args),
            repeats=args.compare_repeats,
            seed=args.seed,
        )
        print(llamacpp_table(report), flush=True)
    elif args.compare_dp_attention:
        from dpattn.tools.bench_dp_attention import (
            DpAttentionBenchConfig,
            compare_dp_attention,
            format_table,
        )

        model_path = resolve_model_path(args.model_path)
        options = engine_options(args)
        dpa = DpAttentionBenchConfig(
            args.tp_size,
            args.num_prompts,
            args.input_len,
            args.output_len,
            options.pop("kv_pool_tokens"),
            args.kv_bytes_per_rank,
            options.pop("mem_fraction_static"),
            args.seed,
        )

        def make_layout(tp: int, dp: int, **overrides: Any) -> Engine:
            return Engine(model_path, **{**options, "tp_size": tp, "dp_size": dp, **overrides})

        # A layout's KV bytes per token are asked from a small engine: on CPU its ranks start
        # as threads (a second; gloo processes take ~15 s at tp 4 on 2 cores), same figure.
        local_cpu = resolve_device(args.device) == "cpu" and args.nnodes == 1
        report = compare_dp_attention(make_layout, dpa, {"backend": "thread"} if local_cpu else {})
        print(format_table(report), flush=True)
    elif args.compare_prefix_cache or args.compare_routing:
        from dpattn.tools.bench_prefix import PrefixBenchConfig, multi_turn, shared_prefix

        prefix = PrefixBenchConfig(
            args.num_prompts,
            args.shared_prefix_len,
            args.input_len,
            args.output_len,
            args.num_turns,
            args.seed,
        )
        model_path = resolve_model_path(args.model_path)
        options = engine_options(args)

        def make_engine(**overrides: Any) -> Engine:
            return Engine(model_path, **{**options, **overrides})

        bench = shared_prefix if args.compare_prefix_cache else multi_turn
        report = bench(make_engine, prefix)
    else:
        cfg = BenchConfig(
            args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed
        )
        model_path = resolve_model_path(args.model_path)
        options = engine_options(args)
        comparison = []
        for dtype in ("float32", "bfloat16") if args.compare_transformers else ():
            with Engine(model_path, **{**options, "dtype": dtype}) as engine:
                comparison += compare_with_transformers(engine, repeats=args.compare_repeats)
        engine = Engine(model_path, **options)
        try:
            if _constrained(args):
                from dpattn.tools.bench_grammar import compare_shares, format_table

                shares = args.constrained_share
                report = compare_shares(engine, cfg, shares, args.compare_repeats)
                print(format_table(report), flush=True)
            else:
                report = run_offline(engine, cfg)
        finally:
            engine.shutdown()
        if comparison:
            report["vs_transformers"] = comparison
    text = json.dumps(report)
    if args.base_url:  # a table to read; the JSON report only in --output
        from dpattn.tools.bench_online import format_table as online_table

        print(online_table(report))
        where = f"written to {args.output}" if args.output else "--output FILE writes it"
        print(f"full report (JSON): {where}", flush=True)
    else:
        print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through `with Engine(...)`: ranks stopped, no orphans


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    configure_logging(args.log_level)
    return run_reporting_errors(lambda: _run(args), debug=args.log_level == "debug")


def _check_layout(args: argparse.Namespace) -> None:
    tp, dp = args.tp_size, args.dp_size
    if tp < 1 or dp < 1:
        raise ValueError(f"--tp {tp} and --dp {dp} must be at least 1")
    if args.pp_size < 1:  # against the model's layers: where the model is read (check_pipeline)
        raise ValueError(f"--pp-size must be at least 1, got {args.pp_size}")
    if tp % dp:
        raise ValueError(f"--tp {tp} must be a multiple of --dp {dp}")


def _constrained(args: argparse.Namespace) -> bool:
    """--constrained-share asks for the side-by-side runs (a lone 0: the plain bench)."""
    return bool(args.constrained_share) and args.constrained_share != [0.0]


def _check_constrained(args: argparse.Namespace) -> None:
    if not _constrained(args):
        return
    if not all(0 <= s <= 1 for s in args.constrained_share):
        raise ValueError(
            f"--constrained-share takes fractions in [0, 1] (got {args.constrained_share})"
        )
    if len(set(args.constrained_share)) < len(args.constrained_share):
        raise ValueError(f"--constrained-share values must differ (got {args.constrained_share})")
    modes = ("base_url", "compare_llamacpp", "compare_dp_attention", "compare_prefix_cache")
    if any(getattr(args, name) for name in modes) or args.compare_routing:
        raise ValueError("--constrained-share runs with the offline bench only")
    if args.output_len < 1:
        raise ValueError("--constrained-share needs --output-len >= 1 (constrained tokens)")


def _bench_defaults(args: argparse.Namespace) -> None:
    """--tp and the workload of `bench` where not given: the DP-attention comparison's own."""
    dpa = args.compare_dp_attention
    if args.tp_size is None:
        args.tp_size = 4 if dpa else 1
    for name, default, compare in (("input_len", 32, 192), ("output_len", 16, 32)):
        if getattr(args, name) is None:
            setattr(args, name, compare if dpa else default)
    if dpa and args.kv_pool_tokens is not None and args.kv_bytes_per_rank is not None:
        raise ValueError("give --max-total-tokens or --kv-bytes-per-rank, not both")


def _check_sampling(params: dict[str, Any], flags: dict[str, str] | None = None) -> None:
    """SamplingParams' own validation (the API's), its message naming the flag."""
    try:
        SamplingParams.from_dict(params)
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        if name not in params:
            raise
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        raise ValueError(f"{flag} {rest}") from None


def _check_request_options(args: argparse.Namespace) -> None:
    """What the requests of `generate` and `bench` will be, checked before any model loads
    (which takes seconds to minutes): a mistake is refused at once."""
    if args.command == "generate":
        if not args.prompt and not args.input_ids and args.node_rank == 0:  # node 0 asks
            raise ValueError("give --prompt or --input-ids")
        _input_ids(args)
        _check_sampling(_sampling_params(args))
    if args.command != "bench":
        return
    # the bench's requests are greedy, ignore_eos, --output-len new tokens (0: prefill only)
    sampling = {"max_new_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True}
    _check_sampling(sampling, {"max_new_tokens": "--output-len"})
    for flag, value in (
        ("--num-prompts", args.num_prompts),
        ("--input-len", args.input_len),
        ("--shared-prefix-len", args.shared_prefix_len),
        ("--num-turns", args.num_turns),
        ("--compare-repeats", args.compare_repeats),
        ("--concurrency", args.concurrency),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1 (got {value})")
    if args.request_rate is not None and not args.request_rate > 0:
        raise ValueError(
            f"--request-rate must be > 0 requests per second (got {args.request_rate})"
        )
    if not 0 <= args.range_ratio <= 1:
        raise ValueError(f"--range-ratio must be in [0, 1] (got {args.range_ratio})")
    _check_constrained(args)
    if args.compare_llamacpp:
        from dpattn.tools.bench_llamacpp import check_options

        check_options(args)


def _run(args: argparse.Namespace) -> int:
    if args.command == "bench":
        _bench_defaults(args)
    if hasattr(args, "tp_size"):
        _check_layout(args)
    _check_request_options(args)
    if args.command == "make-tiny-model":
        path = make_tiny_model(
            args.arch,
            args.out,
            seed=args.seed,
            fused_experts=args.fused_experts,
            dtype=args.dtype,
            mtp_layers=args.mtp_layers,
            **overrides_from_args(args),
        )
        print(path)
        return 0
    if args.command == "verify":
        from dpattn.tools.verify import VerifyConfig, print_report, verify

        cfg = VerifyConfig(
            model_path=resolve_model_path(args.model_path),
            tp=args.tp_size,
            dp=args.dp_size,
            pp=args.pp_size,
            pp_layer_partition=args.pp_layer_partition,
            ep=args.ep,
            moe_dense_tp_size=args.moe_dense_tp_size,
            dp_padding_mode=args.dp_padding_mode,
            mla_mode=args.mla_mode,
            dtype=args.dtype,
            quantization=args.quantization,
            quant_group_size=args.quant_group_size,
            quant_batch_path=args.quant_batch_path,
            backend=args.backend,
            device=args.device,
            num_prompts=args.num_prompts,
            decode_steps=args.decode_steps,
            seed=args.seed,
            atol=args.atol,
            rtol=args.rtol,
            max_kl=args.max_kl,
            reference_model_path=args.reference_model_path
            and resolve_model_path(args.reference_model_path),
            idle_group=args.idle_group,
        )
        report = verify(cfg)
        print_report(report)
        return 0 if report["ok"] else 1
    if args.command in ("generate", "bench", "serve") and _follower(args):
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "router":
        return _router(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench":
        return _bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
