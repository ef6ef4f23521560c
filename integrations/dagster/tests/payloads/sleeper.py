"""A Pipes payload that runs until it is cancelled."""

import time

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    print("sleeping", flush=True)
    time.sleep(600)
