"""Serve a trained run over HTTP, or benchmark a study's runs as services under load.

    python -m bench.serve RUN_DIR [--port 8000] [--max-batch 8] [--kv-budget-mb M] [--max-queue 256]
                                  [--device cpu|cuda] [--dtype float32|bfloat16|float16]
    python -m bench.serve bench RESULTS_DIR [--variants mha gqa] [--request-rate 2 8 inf] [--num-prompts 100]
                                            [--burstiness 1] [--max-concurrency N] [--goodput ttft:100 tpot:20]
                                            [--target URL]

The first starts the service (POST /v1/completions, GET /v1/models, POST /generate, GET /health,
GET /metrics) on the loopback interface unless --host says otherwise. The second starts each variant's
service on the loopback interface in turn (or drives --target, any OpenAI-compatible server), sends
requests open-loop at each offered rate as vLLM's benchmark does, and stores the results in the study's
store (the ``serving`` table, ``bench.results.load(dir).serving``).
"""

from __future__ import annotations

import argparse
import sys


def serve_parser() -> argparse.ArgumentParser:
    """The service's command line (the deployment manifests' arguments are checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description="Serve a trained run over HTTP.")
    parser.add_argument("run_dir", help="a finished run's folder: results/<study>/runs/<run id>")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="most sequences decoded together")
    parser.add_argument("--kv-budget-mb", type=float, default=None,
                        help="most MiB the batch's KV cache may hold at its longest (default: no limit)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="most requests waiting to join the batch; past it a request gets 503 with Retry-After")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the device the run trained on")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="the autocast dtype (default: the one the run trained with)")
    return parser


def serve_main(argv: list[str]) -> int:
    parser = serve_parser()
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_queue < 0:
        parser.error(f"--max-queue must be at least 0, got {args.max_queue}")

    import uvicorn

    from bench.serve.service import build_service

    try:
        app = build_service(args.run_dir, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                            kv_budget_bytes=None if args.kv_budget_mb is None else int(args.kv_budget_mb * 2**20),
                            max_queue=args.max_queue)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from bench.serve.benchmark import main as bench_main

        return bench_main(argv[1:])
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
