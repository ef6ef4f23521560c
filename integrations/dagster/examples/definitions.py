"""An example code location: a partitioned asset computed through the operator, a downstream
asset, the sensor and the specs of assets applied outside Dagster.

Run it against standalone mode (see the package README):

    slurm-asset-operator standalone --dir integrations/dagster/examples/assets &
    dagster dev -f integrations/dagster/examples/definitions.py
"""

import os
from pathlib import Path

import dagster as dg

from dagster_slurm_asset import (
    DirectoryStore,
    PipesSlurmAssetClient,
    SlurmJob,
    SlurmResources,
    build_slurm_asset_sensor,
    slurm_asset_specs,
)

HERE = Path(__file__).parent
# The directory the standalone operator watches; a KubernetesStore("namespace") works the same.
store = DirectoryStore(os.environ.get("SAO_DIR", HERE / "assets"))
slurm = PipesSlurmAssetClient(store, cluster=os.environ.get("SAO_CLUSTER", "laptop"))

daily = dg.DailyPartitionsDefinition(start_date="2026-11-01")


@dg.asset(partitions_def=daily, kinds={"slurm", "python"}, group_name="analytics")
def daily_counts(context: dg.AssetExecutionContext):
    """Counts one day's events on the cluster; the payload sees the partition key."""
    yield from slurm.run(
        context=context,
        spec=SlurmJob(
            script=HERE / "payloads" / "count.py",
            resources=SlurmResources(time_limit="00:10:00", cpus_per_task=1, mem="1G"),
        ),
        extras={"source": "events"},
    ).get_results()


@dg.asset(deps=[daily_counts], group_name="analytics")
def weekly_summary(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """A downstream asset computed in Dagster itself from the counts' metadata."""
    instance = context.instance
    records = instance.fetch_materializations(daily_counts.key, limit=7).records
    total = sum(
        int(r.asset_materialization.metadata["count"].value)
        for r in records
        if r.asset_materialization and "count" in r.asset_materialization.metadata
    )
    return dg.MaterializeResult(metadata={"total_last_7": total})


defs = dg.Definitions(
    assets=[daily_counts, weekly_summary, *slurm_asset_specs(store)],
    sensors=[build_slurm_asset_sensor(store)],
    resources={},
)
