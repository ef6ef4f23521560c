"""A `helm` command for the tests, on the real Helm engine (helm-python-sdk bundles Helm's Go
library; no helm binary is installed here). It takes the subset of helm's command line that
docs/kubernetes.md uses, so tests/k8s_quickstart.rs runs the documented commands as written:

  helm install NAME CHART [-n NS] [--create-namespace] [--set K=V]... [-f FILE]...
  helm upgrade NAME CHART [-n NS] [--install] [--reuse-values] [--set K=V]... [-f FILE]...
  helm uninstall NAME [-n NS]
  helm status NAME [-n NS]
  helm history NAME [-n NS]

The cluster is KUBECONFIG's, as for helm. Anything else is refused (exit 2), so that a doc cannot
use an option this shim would silently ignore.
"""

import argparse
import os
import sys

import helm_python
import yaml
from helm_python import chart as helm_chart


def merge(base, extra):
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def user_values(args):
    values = {}
    for path in args.values:
        with open(path, encoding="utf-8") as f:
            merge(values, yaml.safe_load(f) or {})
    for expression in args.set:
        merge(values, helm_python.parse_set_string(expression))
    return values


def summary(release):
    return (
        f"NAME: {release['name']}\n"
        f"LAST DEPLOYED: {release.get('deployed_at', '')}\n"
        f"NAMESPACE: {release['namespace']}\n"
        f"STATUS: {release['status']}\n"
        f"REVISION: {release['revision']}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="helm")
    parser.add_argument("-n", "--namespace", default="default")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("install", "upgrade"):
        p = sub.add_parser(name)
        p.add_argument("release")
        p.add_argument("chart")
        p.add_argument("-n", "--namespace", dest="ns")
        p.add_argument("--set", action="append", default=[])
        p.add_argument("-f", "--values", action="append", default=[])
        if name == "install":
            p.add_argument("--create-namespace", action="store_true")
        else:
            p.add_argument("--install", action="store_true")
            p.add_argument("--reuse-values", action="store_true")
    for name in ("uninstall", "status", "history"):
        p = sub.add_parser(name)
        p.add_argument("release")
        p.add_argument("-n", "--namespace", dest="ns")
    args = parser.parse_args()
    namespace = getattr(args, "ns", None) or args.namespace
    config = helm_python.Config(kubeconfig_path=os.environ.get("KUBECONFIG"), namespace=namespace)
    if args.command in ("install", "upgrade"):
        chart = helm_chart.Chart.load(args.chart)
        values = user_values(args)
        if args.command == "install":
            release = config.install(chart, args.release, values, namespace=namespace,
                                     create_namespace=args.create_namespace)
        else:
            exists = any(r["name"] == args.release for r in config.list())
            if not exists and args.install:
                release = config.install(chart, args.release, values, namespace=namespace)
            else:
                release = config.upgrade(chart, args.release, values, namespace=namespace,
                                         reuse_values=args.reuse_values)
        print(summary(release), end="")
    elif args.command == "uninstall":
        config.uninstall(args.release)
        print(f'release "{args.release}" uninstalled')
    elif args.command == "status":
        print(summary(config.status(args.release)), end="")
    elif args.command == "history":
        print("REVISION\tSTATUS\tCHART\tAPP VERSION")
        for r in config.history(args.release):
            print(f"{r['revision']}\t{r['status']}\t{r['chart_name']}-{r['chart_version']}\t{r['app_version']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except helm_python.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
