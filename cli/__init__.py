"""The `moefleet` command line: serve, status, scale, add and remove experts, rebalance,
autoscale, top, simulate. A client of the cluster's admin API, on top of every other package."""
