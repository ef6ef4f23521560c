"""Prints the chart's objects as a JSON list, rendered by the real Helm engine.

Usage: render.py RELEASE NAMESPACE VALUES_JSON (used by the Rust tests on the real API server).
"""

import json
import pathlib
import sys

import yaml
from helm_python import chart as helm

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "slurm-asset-operator"


def main() -> None:
    release, namespace, values = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    out = helm.Chart.load(str(CHART)).render(values, name=release, namespace=namespace)
    objs = []
    for path, text in sorted(out.items()):
        if not path.endswith("NOTES.txt"):
            objs += [d for d in yaml.safe_load_all(text) if d]
    json.dump(objs, sys.stdout)


if __name__ == "__main__":
    main()
