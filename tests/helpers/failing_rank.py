"""``gpu-dsm`` under torchrun with one rank made to fail: ``failing_rank.py RANK ARGS...``. The
rank fails when it writes its shard of the queries store, after the database is complete, as a
rank that is killed mid-run would (tests/test_shards.py)."""
import os
import sys

import gpu_dsm.eval.run as run
from gpu_dsm.cli import main

fail_rank = int(sys.argv.pop(1))
write_store = run.write_store


def failing(backbone, specs, names, path, cfg, desc, is_query=False):
    if int(os.environ.get("RANK", "0")) == fail_rank and is_query:
        raise RuntimeError(f"rank {fail_rank} stopped on purpose")
    return write_store(backbone, specs, names, path, cfg, desc, is_query)


run.write_store = failing
sys.exit(main(sys.argv[1:]))
