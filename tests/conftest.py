"""Without a GPU, Triton kernels run in the interpreter: the variable must be set before
triton is first imported (also inherited by the gloo worker processes). Compiled blocks on
the CPU trace, partition and run through ``aot_eager_decomp_partition`` instead of inductor's
C++ code generation (``dtensor_parallel/compiling.py`` says why; one case keeps inductor)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DTP_COMPILE_BACKEND", "aot_eager_decomp_partition")


# Cases on 8 gloo ranks run last, in one block. The harness keeps at most two worker pools
# (tests/harness.py says why), so every start of the 8-rank pool, ~15 s on CI's 2 cores,
# also evicts a 2- or 4-rank pool that the next case restarts; spread over seven files that
# was about a minute and a half of CI. (Only the order changes: a case left off this list
# still runs, in its file's place.)
EIGHT_RANK_CASES = ("test_world8.py::", "test_hf_cli.py::test_hf_train_export_round_trip",
                    "test_checkpoint.py::test_reshard_matrix", "[pp2_tp2_dp2", "[pp2_interleaved_tp2_fsdp2",
                    "[tp2_sp_hsdp2x2", "[cp2_tp2_dp2_selective", "[pp2_cp2_tp2_ep2")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: any(case in item.nodeid for case in EIGHT_RANK_CASES))  # (stable)


def pytest_runtest_logreport(report):
    """With ``DTP_FAILURE_LOG`` set (the GPU scripts set it), each failure's report is appended
    to that file as it happens: a device call that ends at its time limit kills pytest
    before its summary, which would lose every traceback."""
    path = os.environ.get("DTP_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"\n===== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n")
