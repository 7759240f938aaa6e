"""The router: gating, dispatch/combine, micro-batching, the transport to the expert hosts,
and the Router actor's gRPC face. Import the modules themselves; this package's own import
loads nothing, so `moefleet.router.config` stays plain data."""
