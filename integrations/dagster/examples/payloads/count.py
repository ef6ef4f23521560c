"""Runs on the cluster: counts the partition's events and reports them through Pipes."""

import hashlib

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    day = pipes.partition_key
    source = pipes.get_extra("source")
    pipes.log.info(f"counting {source} of {day}")
    count = int(hashlib.sha256(day.encode()).hexdigest()[:4], 16)
    print(f"{day}: {count} {source}")
    pipes.report_asset_materialization(metadata={"count": count, "day": day})
