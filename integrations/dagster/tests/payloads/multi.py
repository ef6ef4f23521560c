"""A Pipes payload for a multi-asset: one materialization per selected asset key."""

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    for key in pipes.asset_keys:
        pipes.report_asset_materialization(asset_key=key, metadata={"key": key})
