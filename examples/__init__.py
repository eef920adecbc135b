"""Tasks written as a user would write one: see examples/README.md."""
