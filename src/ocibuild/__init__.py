"""ocibuild: build container dev environments as explicit, input-addressed OCI layers, without a daemon."""

__version__ = "0.1.0"
