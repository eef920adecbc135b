"""Processes that the tests and the benchmark start: the server under uvicorn or
gunicorn, and services (Redis) of their own on free ports."""
