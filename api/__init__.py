"""The HTTP layer: routes, request limits, and the one place errors become status codes."""
