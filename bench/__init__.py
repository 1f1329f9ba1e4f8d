"""The benchmark harness. No torch in this process."""
