"""Executors run a release command on a member: locally or over SSH."""
