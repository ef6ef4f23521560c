"""Dagster integration of the slurm-asset-operator: run assets on Slurm from Dagster
(`PipesSlurmAssetClient`), and report assets applied outside Dagster (`build_slurm_asset_sensor`,
`slurm_asset_specs`), over Kubernetes (`KubernetesStore`) or a standalone directory
(`DirectoryStore`)."""

from .client import LAUNCHED_BY, PipesSlurmAssetClient
from .names import label_value, object_name, session_name
from .sensor import (
    TAG_RUN,
    TickReport,
    build_run_session_cleanup_sensor,
    build_slurm_asset_sensor,
    end_finished_run_sessions,
    events_for_run,
    report_ended_runs,
    slurm_asset_specs,
)
from .spec import SlurmJob, SlurmResources
from .status import slurm_metadata
from .store import (
    DirectoryStore,
    KubernetesStore,
    SlurmAssetObject,
    SlurmAssetStore,
    StoreError,
    asset_key_of,
)

__all__ = [
    "LAUNCHED_BY",
    "TAG_RUN",
    "DirectoryStore",
    "KubernetesStore",
    "PipesSlurmAssetClient",
    "SlurmAssetObject",
    "SlurmAssetStore",
    "SlurmJob",
    "SlurmResources",
    "StoreError",
    "TickReport",
    "asset_key_of",
    "build_run_session_cleanup_sensor",
    "build_slurm_asset_sensor",
    "end_finished_run_sessions",
    "events_for_run",
    "label_value",
    "object_name",
    "report_ended_runs",
    "session_name",
    "slurm_asset_specs",
    "slurm_metadata",
]
__version__ = "0.1.0"
