"""A trivial Recommender gRPC server: answers Rank at once (or after a fixed service time, one request
at a time, to show queueing in the load tester's latency). Used to measure the generator itself."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

import grpc

from recserve.serving.protos.recommender_pb2 import RankResponse
from recserve.serving.protos.recommender_pb2_grpc import RecommenderServicer, add_RecommenderServicer_to_server


class Trivial(RecommenderServicer):
    def __init__(self, service_ms: float = 0.0):
        self.service_s = service_ms / 1e3
        self.lock = asyncio.Lock()

    async def Rank(self, request, context):  # noqa: N802
        if self.service_s > 0:
            async with self.lock:  # one at a time: a slow server's queue builds up
                await asyncio.sleep(self.service_s)
        return RankResponse(request_id=request.request_id, served_by="trivial")


async def serve(port: int, service_ms: float) -> None:
    server = grpc.aio.server()
    add_RecommenderServicer_to_server(Trivial(service_ms), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"ready {port}", flush=True)
    await server.wait_for_termination()


def spawn(service_ms: float = 0.0) -> tuple[subprocess.Popen, str]:
    """Start the server in its own process (it then has its own interpreter and GIL, as a real
    service would) and wait until it listens: the process (kill it when done) and its address."""
    from recserve.triton.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "recserve.loadtest.trivial", "--port", str(port),
                             "--service-ms", str(service_ms)], stdout=subprocess.PIPE, text=True)
    if not proc.stdout.readline().startswith("ready"):
        proc.kill()
        raise RuntimeError(f"the trivial server did not start (exit code {proc.wait()})")
    return proc, f"127.0.0.1:{port}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--service-ms", type=float, default=0.0)
    a = p.parse_args()
    asyncio.run(serve(a.port, a.service_ms))


if __name__ == "__main__":
    main()
