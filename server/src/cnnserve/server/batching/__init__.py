"""The dynamic batcher: queue, batch plan, execution hand-off, merge and split of rows."""
