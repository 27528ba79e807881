"""Containers and Kubernetes: `make container`, `make container-test` (README "Deploy")."""
