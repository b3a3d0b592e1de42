"""Telemetry: metric definitions now; tracing setup and access logs join here."""
