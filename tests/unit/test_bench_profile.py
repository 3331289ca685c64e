"""bench/profile_router.py's reading of py-spy's raw output (the profiling itself needs a live replica)."""

from __future__ import annotations

from bench.profile_router import frame_name, shares

RAW = """\
Thread.run (threading.py:982);_Connection._rank (serving/grpc_server.py:207);Router.rank (serving/router.py:201) 6
Thread.run (threading.py:982);_Connection._rank (recserve/serving/grpc_server.py:210) 3
<module> (ray/_private/workers/default_worker.py:323);Worker.main_loop (ray/_private/worker.py:1000) 1
"""


def test_frame_names_drop_the_line_and_the_directories() -> None:
    assert frame_name("Router.rank (recserve/serving/router.py:201)") == "Router.rank router.py"
    assert frame_name("idle") == "idle"


def test_shares_count_each_function_once_per_stack_inclusive_and_the_leaf_as_self() -> None:
    total, inclusive, own = shares(RAW + "a malformed line\n\n")
    assert total == 10
    assert inclusive["Thread.run threading.py"] == 9
    assert inclusive["_Connection._rank grpc_server.py"] == 9  # two lines of one function: counted per stack
    assert own == {"Router.rank router.py": 6, "_Connection._rank grpc_server.py": 3, "Worker.main_loop worker.py": 1}
