"""``gpu-dsm`` under torchrun with one rank made to fail: ``failing_rank.py RANK ARGS...``. The
rank fails when it writes its shard of the queries store (or, with ``GPU_DSM_FAIL_AT=how``, when it
describes its slice of the queries' HOW features), after the database is complete, as a rank that
is killed mid-run would (tests/test_shards.py)."""
import os
import sys

import gpu_dsm.eval.run as run
import gpu_dsm.pipeline as pipeline
from gpu_dsm.cli import main

fail_rank = int(sys.argv.pop(1))
fail_at = os.environ.get("GPU_DSM_FAIL_AT", "store")
write_store = run.write_store
describe_how = pipeline.describe_how


def _failing_here() -> bool:
    return int(os.environ.get("RANK", "0")) == fail_rank


def failing_store(backbone, specs, names, path, cfg, desc, is_query=False, **kwargs):
    if fail_at == "store" and _failing_here() and is_query:
        raise RuntimeError(f"rank {fail_rank} stopped on purpose")
    return write_store(backbone, specs, names, path, cfg, desc, is_query, **kwargs)


def failing_how(backbone, specs, whitening, config=None, desc="HOW"):
    if fail_at == "how" and _failing_here() and desc.endswith("-queries"):
        raise RuntimeError(f"rank {fail_rank} stopped on purpose")
    return describe_how(backbone, specs, whitening, config, desc)


run.write_store = failing_store
pipeline.describe_how = failing_how
sys.exit(main(sys.argv[1:]))
