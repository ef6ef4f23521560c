"""A Pipes payload: prints a line, logs through Pipes, optionally waits for a release file
(so a test can see the line reach Dagster before the job ends), then reports a
materialization, a check and a custom message, or exits with the code it is given."""

import os
import sys
import time

from dagster_pipes import DagsterPipesError, open_dagster_pipes

started = time.time()
with open_dagster_pipes() as pipes:
    key = pipes.partition_key
    print(f"early line partition={key}", flush=True)
    pipes.log.info(f"pipes log partition={key} retry={pipes.retry_number}")
    release = pipes.extras.get("release_file")
    if release:
        deadline = time.time() + 300
        while not os.path.exists(release) and time.time() < deadline:
            time.sleep(0.2)
    # Slurm counts elapsed time in whole seconds: a job of under one has no CPU efficiency.
    time.sleep(max(0.0, 1.5 - (time.time() - started)))
    code = pipes.extras.get("exit_code")
    if code:
        print("about to fail", file=sys.stderr, flush=True)
        sys.exit(int(code))
    try:
        window = pipes.partition_time_window
    except DagsterPipesError:  # a partition that is not a time window
        window = None
    pipes.report_asset_materialization(
        metadata={
            "partition": key,
            "rows": pipes.get_extra("rows"),
            "window_start": window["start"] if window else "",
            "run_id": pipes.run_id,
        },
        data_version=f"v-{key}",
    )
    pipes.report_asset_check(
        check_name="non_empty", passed=True, metadata={"rows": pipes.get_extra("rows")}
    )
    pipes.report_custom_message({"partition": key})
    print(f"done partition={key}", flush=True)
