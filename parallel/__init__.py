"""Parallelism: device meshes and logical-axis sharding rules (planned: see the issues)."""
