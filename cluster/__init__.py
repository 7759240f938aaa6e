"""The control plane: model spec, Controller, placement, bring-up, admin API and CLI.

Only the spec (plain data) is exported here, so importing the package needs no Ray.
"""

from .spec import HostsConfig, ModelSpec, load_spec

__all__ = ["ModelSpec", "HostsConfig", "load_spec"]
