"""The distribution API: see :mod:`.client`. These are the names users import (``registry.Client``)."""

from .client import (DEFAULT_JOBS, Client, Distribution, FetchedManifest, Registries, TransferStats, fetch_image,
                     fetch_manifests, find_manifests, missing_bytes, parse_repository, push_manifests, resolve_image,
                     select_platform)

__all__ = ["DEFAULT_JOBS", "Client", "Distribution", "FetchedManifest", "Registries", "TransferStats", "fetch_image",
           "fetch_manifests", "find_manifests", "missing_bytes", "parse_repository", "push_manifests", "resolve_image",
           "select_platform"]
