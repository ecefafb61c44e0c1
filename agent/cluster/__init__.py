"""Cluster mode: hosts, VM ownership and placement kept in etcd (docs/CLUSTER.md).

Only an agent started with `--etcd` uses this package; two-agent mode never imports etcd's client.
"""
