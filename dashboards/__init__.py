"""Grafana dashboards and Prometheus alert rules, kept as code next to the metrics they chart."""
