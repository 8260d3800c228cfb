"""The release desk (`changeover desk`): a JSON API under /api/, one HTML page
and /metrics, all calling the same `Releases` methods as the CLI (docs/desk.md)."""
