"""Balancer drivers behind one small interface (see `base.Balancer`)."""
