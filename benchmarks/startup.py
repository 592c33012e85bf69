"""Start-up of `sglc serve --compiled DIR`: seconds from launching the server to the first healthy
/health_generate (weights loaded, memory planned, CUDA graphs captured, one token generated).

    python benchmarks/startup.py --model dummy:llama-3.1-8b [--artifact DIR] [--out FILE]

Compiles the artifact first (timed separately) unless DIR already holds one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CLI = [sys.executable, "-m", "sgl_compile.cli"]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health_generate", timeout=5) as r:
            return r.status == 200 and r.read() == b"ok"
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--artifact", default="/tmp/sglc-startup-artifact")
    ap.add_argument("--port", type=int, default=30777)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--output-file", dest="out")  # the name benchmarks/gpu.py passes
    args, extra = ap.parse_known_args()
    result: dict = {"model": args.model}
    artifact = Path(args.artifact)
    if not (artifact / "manifest.json").exists():
        start = time.perf_counter()
        subprocess.run(CLI + ["compile", "--model", args.model, "--device", "cuda", "--dtype", args.dtype,
                              "--out", str(artifact)], check=True)  # fmt: skip
        result["compile_s"] = time.perf_counter() - start
    log = open(Path(args.out).with_suffix(".serve.log") if args.out else os.devnull, "w")  # noqa: SIM115
    start = time.perf_counter()
    server = subprocess.Popen(
        CLI + ["serve", "--compiled", str(artifact), "--port", str(args.port), *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        while not healthy(args.port):
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}")
            if time.perf_counter() - start > args.timeout:
                raise SystemExit("server not healthy in time")
            time.sleep(0.2)
        result["startup_s"] = time.perf_counter() - start
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
