"""A Python payload that reports a materialization through the real dagster-pipes package.

Needs `dagster-pipes` importable by `python3` (scripts/run-examples sets up a venv with it;
otherwise: `pip install dagster-pipes`).
"""

import time

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    rows = int(pipes.get_extra("rows"))
    pipes.log.info(f"training on {rows} rows")
    total = 0
    deadline = time.time() + 0.5
    while time.time() < deadline:  # a little real CPU work
        total += sum(range(1000))
    pipes.report_asset_materialization(
        metadata={
            "rows": rows,
            "model": {"raw_value": "ridge", "type": "text"},
            "loss": 0.125,
        },
        data_version="v1",
    )
    pipes.report_asset_check(check_name="loss_below_one", passed=True, metadata={"loss": 0.125})
    print(f"trained, checksum {total % 97}")
