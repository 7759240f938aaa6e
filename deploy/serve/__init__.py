"""moefleet as a Ray Serve application: Serve owns its lifecycle and health checks, while
inference stays on moefleet's own gRPC router (see app.py)."""
