"""``python -m dtensor_parallel <command> ...``: see :mod:`dtensor_parallel.cli`."""

from torch.distributed.elastic.multiprocessing.errors import record

from .cli import main

if __name__ == "__main__":
    # record: under torchrun a failing rank's traceback lands in the launcher's failure summary
    raise SystemExit(record(main)())
