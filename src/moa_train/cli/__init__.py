"""Command-line layer: entry points, the Hydra job, launchers, validation, sweep summary, export."""
