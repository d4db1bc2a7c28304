"""What the API and the worker share: queue protocol, manifest, settings, sizes, metrics. No torch."""
