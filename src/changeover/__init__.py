"""changeover: zero-downtime releases across separate clusters behind a load balancer."""

__version__ = "0.1.0"
