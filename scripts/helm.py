#!/usr/bin/env python3
"""`helm install`, `helm upgrade` and `helm uninstall` through the real Helm v4
engine embedded in helm-python-sdk (`pip install helm-python-sdk`), for
machines without a `helm` binary. The flags are Helm's own:

    python3 scripts/helm.py install chorus charts/chorus --namespace chorus-system --create-namespace --wait
    python3 scripts/helm.py upgrade chorus charts/chorus --namespace chorus-system --set logging.level=debug --wait
    python3 scripts/helm.py uninstall chorus --namespace chorus-system

The cluster is the one KUBECONFIG (or --kubeconfig) names.
"""

import argparse
import os
import sys

try:
    import helm_python
except ImportError:
    sys.exit("helm.py: helm-python-sdk is missing: python3 -m pip install helm-python-sdk")


def merge(into: dict, more: dict) -> dict:
    """Deep merge, later values winning, as Helm merges -f and --set."""
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def values(args) -> dict:
    out: dict = {}
    for path in args.values:
        with open(path, encoding="utf-8") as f:
            merge(out, helm_python.values_from_yaml(f.read()))
    for expr in args.set:
        merge(out, helm_python.parse_set_string(expr))
    for expr in args.set_string:
        merge(out, helm_python.parse_set_string_values(expr))
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="helm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("install", "upgrade"):
        s = sub.add_parser(name)
        s.add_argument("release")
        s.add_argument("chart")
        s.add_argument("-n", "--namespace", default="default")
        s.add_argument("-f", "--values", action="append", default=[])
        s.add_argument("--set", action="append", default=[])
        s.add_argument("--set-string", action="append", default=[])
        s.add_argument("--wait", action="store_true", help="wait until the release's objects are ready")
        s.add_argument("--timeout", type=int, default=300, help="seconds")
        if name == "install":
            s.add_argument("--create-namespace", action="store_true")
        else:
            s.add_argument("--install", action="store_true", help="install when the release does not exist")
            s.add_argument("--reuse-values", action="store_true")
    s = sub.add_parser("uninstall")
    s.add_argument("release")
    s.add_argument("-n", "--namespace", default="default")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--timeout", type=int, default=300)
    s.add_argument("--ignore-not-found", action="store_true")
    args = p.parse_args()
    if not args.kubeconfig:
        sys.exit("helm.py: set KUBECONFIG or pass --kubeconfig")

    config = helm_python.Config(kubeconfig_path=args.kubeconfig, namespace=args.namespace)
    wait = "watcher" if args.wait else None
    try:
        if args.command == "install":
            release = config.install(
                args.chart, args.release, values(args), namespace=args.namespace,
                create_namespace=args.create_namespace, wait=wait, timeout=args.timeout,
            )
        elif args.command == "upgrade":
            if args.install and not any(r.get("name") == args.release for r in config.list() or []):
                release = config.install(
                    args.chart, args.release, values(args), namespace=args.namespace,
                    wait=wait, timeout=args.timeout,
                )
            else:
                release = config.upgrade(
                    args.chart, args.release, values(args), namespace=args.namespace,
                    wait=wait, timeout=args.timeout, reuse_values=args.reuse_values,
                )
        else:
            release = config.uninstall(
                args.release, wait=wait, timeout=args.timeout, ignore_not_found=args.ignore_not_found,
            )
    except helm_python.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    finally:
        config.close()
    # What helm prints.
    print(f"NAME: {release.get('name', args.release)}")
    print(f"NAMESPACE: {release.get('namespace', args.namespace)}")
    print(f"STATUS: {release.get('status', 'uninstalled' if args.command == 'uninstall' else '')}")
    if release.get("revision") is not None:
        print(f"REVISION: {release['revision']}")
    if release.get("notes"):
        print(f"\nNOTES:\n{release['notes'].rstrip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
