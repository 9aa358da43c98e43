"""Peer serving systems for benchmarks/bench_serving.py ``--peer``: each one's venv, server process and model file."""
